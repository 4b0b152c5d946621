"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"; the estimator of Kool et al. 2019).

The whole response is one action. For each prompt, k responses y_1..y_k are sampled from the current
policy; each one's reward is its score minus beta times the KL of the whole response (in the reward,
as in the paper and TRL's RLOOTrainer), and its baseline is the mean reward of the other k - 1:

    R_i = r_i - beta * sum_t kl_{i,t}            r: normalised score; kl: the run's per-token estimator
    b_i = (1 / (k - 1)) sum_{j != i} R_j          leave-one-out: the other samples of i's prompt
    A_i = R_i - b_i                               (= k / (k - 1) * (R_i - mean_g R))
    L   = -(1 / B) sum_i A_i * sum_t log pi(y_{i,t})

b_i does not depend on y_i, so A_i * grad log pi(y_i) is an unbiased estimate of the policy gradient
(REINFORCE with a baseline); the k samples serve as each other's baselines, with no critic. beta is the
run's ``kl.coef`` (``rollouts.kl_coef``), and the estimator ``kl.estimator`` (k1 by default, TRL's).

REINFORCE is on-policy: one pass over each batch (``check`` refuses another ``algorithm.ppo_epochs``).
The minibatches of an iteration after its first see a policy moved by the earlier steps; the loss
ignores this, and ``train/approx_kl`` measures how far pi has moved from the sampling policy.
``whiten_advantages`` (off, as in the paper and TRL's normalize_advantages) whitens A over the batch.

How it differs from ppo_sampled with baseline=leave_one_out (the same R_i, b_i and A_i):
    - no ratio and no clip: the gradient is the on-policy score function A_i * grad log pi(y_i), not the
      clipped surrogate that lets ppo_sampled take several epochs over a batch (TRL's RLOOTrainer keeps a
      sequence-level clipped ratio; the paper's RLOO, this one, has none);
    - the log-prob of the whole response, a sum over its tokens, not a mean over the minibatch's tokens;
    - one epoch, not four.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.base import Algorithm, AlgorithmConfig, Policy, register
from algorithms.ppo_sampled import batch_advantages, leave_one_out_baseline, sequence_reward
from backbone.batch import Batch, Rollouts
from backbone.ops import masked_mean, masked_sum
from backbone.sources import Online


def reinforce_loss(logprobs: Tensor, mask: Tensor, advantages: Tensor) -> Tensor:
    """L = -(1 / B) sum_i A_i * sum_t log pi(y_{i,t}) over valid tokens: logprobs, mask [B, T]; A [B]."""
    return -(advantages * masked_sum(logprobs, mask, dim=1)).mean()


@dataclass
class RLOOConfig(AlgorithmConfig):
    """RLOO: k samples per prompt, leave-one-out baseline, REINFORCE on the whole response."""

    _target_: str = "algorithms.rloo.RLOO"
    name: str = "rloo"
    # ppo_sampled's; on toy_reviews 1e-4 barely moves in 30 iterations and 1e-3 over-optimises (gold
    # falls on one seed of three)
    lr: float = 3e-4
    # on-policy: one pass per batch
    ppo_epochs: int = 1
    # k; the paper uses 2 and 4, TRL's rloo_k is 2
    samples_per_prompt: int = 4
    whiten_advantages: bool = False


@register(RLOOConfig)
class RLOO(Algorithm):
    def __init__(self, **values):
        super().__init__(**values)
        if self.samples_per_prompt < 2:
            # a leave-one-out baseline needs another sample of the prompt
            raise ValueError(f"RLOO needs samples_per_prompt >= 2, got {self.samples_per_prompt}")

    @property
    def source(self) -> Online:
        return Online(self.samples_per_prompt)

    def check(self, cfg) -> list[str]:
        if self.ppo_epochs == 1:
            return []
        return [
            f"algorithm.ppo_epochs={self.ppo_epochs}: {self.name} is REINFORCE, on-policy, with no ratio "
            "to correct a second pass over a batch; it takes one"
        ]

    def prepare(self, rollouts: Rollouts) -> Batch:
        seq_rewards = sequence_reward(rollouts)  # [B] R_i
        baselines = leave_one_out_baseline(seq_rewards, rollouts.group)  # [B] b_i
        advantages, stats = batch_advantages(seq_rewards - baselines, self.whiten_advantages)  # [B] A_i
        tensors = {"advantages": advantages, "seq_rewards": seq_rewards, "baselines": baselines}
        return Batch(rollouts, tensors, stats)

    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rollouts = batch.rollouts
        out = policy.forward(rollouts)
        mask = rollouts.response_mask.to(out.logprobs.dtype)  # [B, T]
        loss = reinforce_loss(out.logprobs, mask, batch["advantages"])
        with torch.no_grad():
            log_ratio = (out.logprobs - rollouts.logprobs) * mask  # [B, T] log pi / pi_old, 0 on pads
            stats = {
                "policy_loss": loss.detach(),
                "entropy": masked_mean(out.entropy, mask),
                # (rho - 1) - log rho: how far pi has moved from the sampling policy, KL(pi_old || pi)
                "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                "baseline_mean": batch["baselines"].mean(),
                "sequence_reward_mean": batch["seq_rewards"].mean(),
            }
        return loss, stats
