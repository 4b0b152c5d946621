"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), as TRL's GRPOTrainer has it.

For each prompt, a group of n responses o_1..o_n is sampled from the current policy pi_old and scored:
r_i is the normalised reward-model score, with no KL penalty in it. The baseline is the group itself,
no critic: every token of o_i gets the group-normalised reward as its advantage,

    A_i = (r_i - mean_g r) / (std_g r + eps)        std_g unbiased (Bessel, torch.std's), eps = 1e-4

and the policy minimises PPO's clipped surrogate per token, with the KL to the reference policy a
term of the loss, estimated per token by k3 on the current policy's own log-probs (with gradient):

    rho_{i,t} = pi(o_{i,t}) / pi_old(o_{i,t})
    k3_{i,t}  = exp(ref - logp) - (ref - logp) - 1       logp = log pi(o_{i,t}), ref = log pi_ref(o_{i,t})
    l_{i,t}   = -min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_clip, 1 + eps_clip) A_i) + beta * k3_{i,t}
    L         = (1 / n) sum_i (1 / |o_i|) sum_t l_{i,t}           over the group, then over the prompts

TRL's conventions, read in huggingface/trl trl/trainer/grpo_trainer.py @ 000bb3db (v1.10.0.dev0,
f2cd5771, keeps them): the std is torch's unbiased one, eps 1e-4 outside the square root, k3 as
written above, the three aggregations below (``token`` is TRL's bnpo), epsilon (our ``cliprange``)
0.2, num_iterations (our ``ppo_epochs``) 1.

``scale_rewards``: ``group`` divides by std_g + eps as above; ``none`` keeps A_i = r_i - mean_g r (Dr.
GRPO: dividing by the std weighs the prompts whose samples score alike, too easy or too hard, up).
A group whose samples all score the same has A = 0 on every sample: it gives no signal
(``train/zero_std_frac``, the fraction of such groups).

``loss_type``, how the per-token terms l_{i,t} of a minibatch of B responses become the loss (every
one is linear, so L = agg(surrogate) + beta * agg(k3)):

    grpo     (1 / B) sum_i (1 / |o_i|) sum_t l_{i,t}      the paper: a sequence's tokens share its weight
    token    sum_{i,t} l_{i,t} / sum_i |o_i|               every token weighs the same (DAPO, TRL's bnpo)
    dr_grpo  sum_{i,t} l_{i,t} / (B * max_new_tokens)      Dr. GRPO's constant normaliser

Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") is ``scale_rewards=none
loss_type=dr_grpo``: neither the std division nor the 1 / |o_i| that favours long wrong answers.
Its constant is the generation budget: ``max_new_tokens`` follows ``rollout.max_new_tokens`` (the
config interpolates it; the response tensors' width is the longest response of the batch, not the
budget). An algorithm is given only its own config, so the budget reaches it as a key of it, and
``check`` refuses a value other than the rollout's.

beta is the run's KL coefficient (``rollouts.kl_coef``: ``kl.coef``, or the adaptive controller's
value), so the same kl sweeps apply to GRPO as to every algorithm; its KL is k3 in the loss, and
GRPO reads no shaping estimator, so ``check`` refuses a ``kl.estimator`` other than the default.

With one epoch (the default) pi_old is the sampling policy, so the ratio of the iteration's first
minibatch is 1 (to the rounding of generation's log-probs); later minibatches see the policy their
predecessors moved, and the clip bounds how far.

How it differs from ppo_sampled (baseline=sampled_mean, the same group mean):
    - the advantage is divided by the group's std (scale_rewards=group), each prompt's to unit scale;
    - the KL is not in the reward: ppo_sampled charges beta * sum_t kl_{i,t} in R_i, which reaches the
      policy only through A_i (a score-function gradient); GRPO differentiates beta * k3 per token;
    - the aggregation is a choice (ppo_sampled: the mean over all tokens, ``token``);
    - one epoch by default (TRL's num_iterations), not four.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from omegaconf import II
from torch import Tensor

from algorithms.base import Algorithm, AlgorithmConfig, Policy, register
from algorithms.ppo_sampled import batch_advantages, group_mean_baseline, group_sums
from backbone.batch import Batch, Rollouts
from backbone.config import KLConfig, choice
from backbone.kl import kl_estimate
from backbone.losses import clipped_policy_loss
from backbone.ops import masked_mean, masked_sum
from backbone.sources import Online

ScaleRewards = choice("ScaleRewards", "group none", __name__)
LossType = choice("LossType", "grpo token dr_grpo", __name__)
# added to the group's std before dividing (TRL's)
EPS = 1e-4
# a group whose rewards' std is below this scored every sample the same: no signal
ZERO_STD = 1e-6


def group_std(rewards: Tensor, group: Tensor) -> Tensor:
    """std_g = sqrt(sum_{j in g} (r_j - mean_g r)^2 / (n_g - 1)), unbiased, on each row of g. [B] -> [B]"""
    squares, counts, index = group_sums((rewards - group_mean_baseline(rewards, group)) ** 2, group)
    return (squares / (counts - 1)).sqrt()[index]


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, max_new_tokens: int) -> Tensor:
    """The loss of per-token terms l [B, T] over the valid tokens (``mask`` [B, T]), by ``loss_type``."""
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()  # (1 / B) sum_i (1 / |o_i|) sum_t l_{i,t}
    if loss_type == "token":
        return masked_mean(per_token, mask)  # sum_{i,t} l_{i,t} / sum_i |o_i|
    return masked_sum(per_token, mask) / (mask.shape[0] * max_new_tokens)  # / (B * max_new_tokens)


@dataclass
class GRPOConfig(AlgorithmConfig):
    """GRPO: n samples per prompt, group-normalised advantage, clipped surrogate + beta * k3 in the loss."""

    _target_: str = "algorithms.grpo.GRPO"
    name: str = "grpo"
    lr: float = 3e-4
    # TRL's num_iterations
    ppo_epochs: int = 1
    # TRL's num_generations: 8 prompts per iteration at rollout.samples_per_iteration=64 (4 learns as
    # fast on toy_reviews, with a wider spread over seeds)
    samples_per_prompt: int = 8
    # group: A = (r - mean_g) / (std_g + 1e-4); none: A = r - mean_g (Dr. GRPO)
    scale_rewards: ScaleRewards = ScaleRewards.group
    # TRL's epsilon
    cliprange: float = 0.2
    # grpo (per-sequence token mean, then mean over sequences) | token | dr_grpo (/ (B * max_new_tokens))
    loss_type: LossType = LossType.grpo
    # dr_grpo's constant: the generation budget, which this follows
    max_new_tokens: int = II("rollout.max_new_tokens")


@register(GRPOConfig)
class GRPO(Algorithm):
    def __init__(self, **values):
        super().__init__(**values)
        if self.samples_per_prompt < 2:
            # one sample is its own group mean (A = 0) and has no std
            raise ValueError(f"GRPO needs samples_per_prompt >= 2, got {self.samples_per_prompt}")

    @property
    def source(self) -> Online:
        return Online(self.samples_per_prompt)

    def check(self, cfg) -> list[str]:
        problems = []
        if cfg.kl.estimator != KLConfig.estimator:
            problems.append(
                f"kl.estimator={cfg.kl.estimator}: {self.name} puts beta * k3 of the current policy in its "
                f"loss and reads no shaping estimator; leave kl.estimator at {KLConfig.estimator}"
            )
        if self.max_new_tokens != cfg.rollout.max_new_tokens:
            problems.append(
                f"algorithm.max_new_tokens={self.max_new_tokens}: dr_grpo's normaliser is the generation "
                f"budget rollout.max_new_tokens={cfg.rollout.max_new_tokens}, which the key follows unset"
            )
        return problems

    def prepare(self, rollouts: Rollouts) -> Batch:
        rewards, group = rollouts.rewards, rollouts.group  # [B], [B]
        std = group_std(rewards, group)  # [B] std_g r on every row of g
        advantages = rewards - group_mean_baseline(rewards, group)  # [B] r_i - mean_g r
        if self.scale_rewards == "group":
            advantages = advantages / (std + EPS)
        _, stats = batch_advantages(advantages, whiten=False)
        stats.update(
            # per row, which is per group: every group of an iteration is the same size
            group_reward_std=std.mean(),
            zero_std_frac=(std < ZERO_STD).to(std.dtype).mean(),
        )
        return Batch(rollouts, {"advantages": advantages}, stats)

    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rollouts = batch.rollouts
        out = policy.forward(rollouts)
        mask = rollouts.response_mask.to(out.logprobs.dtype)  # [B, T]
        advantages = batch["advantages"][:, None].expand_as(out.logprobs)  # [B, T]: A_i on every token of i
        agg = partial(aggregate, loss_type=self.loss_type, max_new_tokens=self.max_new_tokens)
        surrogate, stats = clipped_policy_loss(
            out.logprobs, rollouts.logprobs, advantages, mask, self.cliprange, agg
        )
        # k3 of the current policy against the reference, with gradient; 0 on pads (x = 0 there)
        k3 = kl_estimate(out.logprobs * mask, rollouts.ref_logprobs * mask, "k3")  # [B, T]
        loss = surrogate + rollouts.kl_coef * agg(k3, mask)
        stats.update(  # policy_loss (the surrogate), clipfrac, approx_kl, ratio_mean
            kl=masked_mean(k3.detach(), mask),
            entropy=masked_mean(out.entropy.detach(), mask),
        )
        return loss, stats
