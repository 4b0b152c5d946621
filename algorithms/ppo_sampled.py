"""Single-step PPO (ColossalAI-Chat's coati PPO), with coati's critic or a baseline sampled instead.

A response is one action: one reward per response, no time steps, no GAE. With n responses sampled
per prompt, the baseline can be computed from the other samples of the same prompt instead of a critic.

    R_i = r_i - beta * sum_t kl_{i,t}        sequence reward: normalised score minus the sequence KL
    A_i = R_i - b_i                          one advantage per response, shared by all its tokens
    L   = masked_mean_{i,t} -min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i),  rho = pi / pi_old

The baseline b_i (``baseline``):
    sampled_mean    mean of R over the n samples of i's prompt, i included
    leave_one_out   mean of R over the other n - 1 samples (RLOO); = n / (n - 1) * (R_i - mean)
    critic          V(x_i), the critic's value of the prompt state (at the first response position)
    critic_coati    V(x_i, y_i) = mean_l v_l, coati's critic: its per-position values v_l averaged over
                    the whole sequence, prompt and response tokens (pads masked)

A critic is fitted to R, where the baseline reads it, with coati's clipped value loss, added to L
with weight vf_coef:

    L_vf = 0.5 * mean_i max((V_i - R_i)^2, (clip(V_i, V_old_i - c, V_old_i + c) - R_i)^2)

coati's Critic averages over every column but the last, pads included; masking the pads keeps V
independent of a batch's padding. (coati's example train_prompts.py sets use_action_mask, which
averages over the prompt's positions only: a value of the prompt, like ``critic``.)

kl_{i,t} is the backbone's configured per-token estimator (coati uses k3 averaged over tokens; we sum,
as RLOO does, so beta prices the KL of the whole response). Group baselines are computed per prompt
from ``rollouts.group`` and accept groups of different sizes (each is divided by its own count).
The raw advantages' mean and std over the whole batch, before any whitening, are logged for every
baseline (``train/advantage_mean``, ``train/advantage_std``): the source's critic gives "tiny advantages".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from algorithms.base import Algorithm, AlgorithmConfig, Policy, register
from backbone.batch import Batch, Rollouts
from backbone.config import choice
from backbone.losses import clipped_policy_loss, clipped_value_loss
from backbone.ops import global_masked_mean_var, masked_mean, masked_sum, masked_whiten
from backbone.sources import Online

Baseline = choice("Baseline", "sampled_mean leave_one_out critic critic_coati", __name__)
CRITIC_BASELINES = ("critic", "critic_coati")
# the critic's own knobs, read only where a baseline is a critic
CRITIC_KEYS = ("cliprange_value", "vf_coef")


def sequence_reward(rollouts: Rollouts) -> Tensor:
    """R_i = r_i - beta * sum_t kl_{i,t}, over i's valid response tokens only. [B]"""
    mask = rollouts.response_mask.to(rollouts.kl.dtype)  # [B, T]
    return rollouts.rewards - rollouts.kl_coef * masked_sum(rollouts.kl, mask, dim=1)


def group_sums(x: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group sums and sizes of ``x`` [B]: (sums [G], counts [G], each row's group 0..G-1 [B])."""
    _, index, counts = torch.unique(group, return_inverse=True, return_counts=True)
    sums = x.new_zeros(len(counts)).index_add_(0, index, x)
    return sums, counts, index


def group_mean_baseline(rewards: Tensor, group: Tensor) -> Tensor:
    """b_i = (1 / n_g) sum_{j in g(i)} R_j, the mean reward of i's group, i included. [B] -> [B]"""
    sums, counts, index = group_sums(rewards, group)
    return (sums / counts)[index]


def leave_one_out_baseline(rewards: Tensor, group: Tensor) -> Tensor:
    """b_i = (sum_{j in g(i)} R_j - R_i) / (n_g - 1), the mean of the others in i's group. [B] -> [B]"""
    sums, counts, index = group_sums(rewards, group)
    if counts.min() < 2:
        raise ValueError("leave_one_out_baseline needs at least 2 samples in every group")
    return (sums[index] - rewards) / (counts[index] - 1)


def batch_advantages(advantages: Tensor, whiten: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """One advantage per response [B], whitened over the batch when ``whiten``, and the raw advantages'
    mean and std over the batch (whitening would set the std to 1); both global over data-parallel ranks."""
    every = torch.ones_like(advantages)
    mean, var = global_masked_mean_var(advantages, every)
    stats = {"advantage_mean": mean, "advantage_std": var.sqrt()}
    if whiten:
        advantages = masked_whiten(advantages, every, moments=(mean, var))
    return advantages, stats


@dataclass
class PPOSampledConfig(AlgorithmConfig):
    """Single-step PPO: n samples per prompt, advantage = sequence reward - baseline."""

    _target_: str = "algorithms.ppo_sampled.PPOSampled"
    name: str = "ppo_sampled"
    lr: float = 3e-4
    samples_per_prompt: int = 4
    # sampled_mean | leave_one_out | critic (V of the prompt) | critic_coati (ColossalAI-Chat's critic:
    # its values averaged over the whole sequence)
    baseline: Baseline = Baseline.sampled_mean
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.5
    whiten_advantages: bool = False


@register(PPOSampledConfig)
class PPOSampled(Algorithm):
    def __init__(self, **values):
        super().__init__(**values)
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.baseline not in CRITIC_BASELINES and self.samples_per_prompt < 2:
            # n = 1: the sampled mean is the reward itself (A = 0) and leave-one-out has no others
            raise ValueError(
                f"baseline={self.baseline} needs samples_per_prompt >= 2, got {self.samples_per_prompt}"
            )
        self.needs_critic = self.baseline in CRITIC_BASELINES
        self.values_per = "sequence" if self.baseline == "critic_coati" else "token"

    @property
    def source(self) -> Online:
        return Online(self.samples_per_prompt)

    def check(self, cfg) -> list[str]:
        if self.needs_critic:
            return []
        defaults = {f.name: f.default for f in fields(self.Config)}
        return [
            f"algorithm.{key}={getattr(self, key)}: {self.name} trains no critic "
            f"with baseline={self.baseline}"
            for key in CRITIC_KEYS
            if getattr(self, key) != defaults[key]
        ]

    def critic_value(self, values: Tensor) -> Tensor:
        """The critic's value the baseline reads, [B]: V(prompt), the first response position of the
        per-token values [B, T]; or coati's V(prompt, response), already one per sequence."""
        return values if self.values_per == "sequence" else values[:, 0]

    def prepare(self, rollouts: Rollouts) -> Batch:
        seq_rewards = sequence_reward(rollouts)  # [B]
        if self.needs_critic:
            baselines = self.critic_value(rollouts.values)  # [B]
        elif self.baseline == "sampled_mean":
            baselines = group_mean_baseline(seq_rewards, rollouts.group)  # [B]
        else:
            baselines = leave_one_out_baseline(seq_rewards, rollouts.group)  # [B]
        advantages, stats = batch_advantages(seq_rewards - baselines, self.whiten_advantages)  # [B]
        tensors = {"advantages": advantages, "seq_rewards": seq_rewards, "baselines": baselines}
        return Batch(rollouts, tensors, stats)

    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rollouts = batch.rollouts
        out = policy.forward(rollouts, values=self.needs_critic)
        mask = rollouts.response_mask.to(out.logprobs.dtype)  # [B, T]
        advantages = batch["advantages"][:, None].expand_as(out.logprobs)  # [B, T]: A_i on every token of i
        old_logprobs = rollouts.logprobs  # [B, T]
        loss, pg_stats = clipped_policy_loss(out.logprobs, old_logprobs, advantages, mask, self.cliprange)
        stats = {
            **pg_stats,  # policy_loss, clipfrac, approx_kl, ratio_mean
            "entropy": masked_mean(out.entropy.detach(), mask),
            "baseline_mean": batch["baselines"].mean(),
            "sequence_reward_mean": batch["seq_rewards"].mean(),
        }
        if self.needs_critic:
            # Fitted only where the baseline reads it, one value per response: for ``critic`` V(prompt),
            # of which R is an unbiased sample. Later positions see part of the response (and R still
            # charges the KL of tokens already emitted), so R is not their return; fitting them would
            # weight the loss by response length and spend the critic on values nobody uses.
            values = self.critic_value(out.values)[:, None]  # [B, 1]
            old_values = self.critic_value(rollouts.values)[:, None]  # [B, 1]
            value_loss, vf_stats = clipped_value_loss(
                values,
                old_values,
                batch["seq_rewards"][:, None],
                torch.ones_like(values),
                self.cliprange_value,
            )
            loss = loss + self.vf_coef * value_loss
            stats.update(vf_stats)  # value_loss, value_clipfrac, value_mean, explained_variance
        return loss, stats
