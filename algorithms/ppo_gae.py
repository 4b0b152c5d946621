"""Multi-step PPO with a per-token KL penalty, a critic and GAE (Ziegler et al. 2019; trlx).

Each response is an episode whose actions are its tokens. The reward is dense in the KL
penalty and sparse in the reward model's score:

    r_t = -beta * KL_t  (+ score on the last response token: EOS, or the last one if truncated)

the critic V_t estimates the return from token t, and the advantage is GAE (Schulman et al. 2016):

    delta_t = r_t + gamma * V_{t+1} - V_t,        V_{t+1} = 0 past the last token
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                           (the critic's target)

The loss is PPO's clipped surrogate plus the clipped value loss (``backbone.losses``):

    L = L_pg(A) + vf_coef * L_vf(R)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.base import Algorithm, AlgorithmConfig, Policy, register
from backbone.batch import Batch, Rollouts
from backbone.losses import clipped_policy_loss, clipped_value_loss
from backbone.ops import masked_mean, masked_whiten


def token_rewards(kl: Tensor, kl_coef: float, scores: Tensor, mask: Tensor) -> Tensor:
    """r_t = -beta * KL_t on every valid token, plus the score [B] on each row's last valid token."""
    rewards = -kl_coef * kl * mask  # [B, T]
    last = mask.sum(dim=1).long() - 1  # [B] index of EOS, or of the last token if truncated
    rewards[torch.arange(len(rewards)), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns [B, T] of right-padded episodes; both are 0 on pads.

    Rewards and values are masked first, so a row's V_{t+1} past its last token is 0 and the
    recursion runs through its padding as zeros: nothing from a pad reaches a valid token.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # [B, T]
    advantages = torch.zeros_like(values)  # [B, T]
    next_value = torch.zeros_like(values[:, 0])  # [B] V_{t+1}
    next_advantage = torch.zeros_like(values[:, 0])  # [B] A_{t+1}
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # delta_t = r_t + gamma V_{t+1} - V_t
        next_advantage = delta + gamma * lam * next_advantage  # A_t = delta_t + gamma lam A_{t+1}
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = advantages + values  # R_t = A_t + V_t
    return advantages, returns


@dataclass
class PPOGAEConfig(AlgorithmConfig):
    """Multi-step PPO with a per-token KL penalty, a critic and GAE (trlx)."""

    _target_: str = "algorithms.ppo_gae.PPOGAE"
    name: str = "ppo_gae"
    lr: float = 3e-4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.5
    whiten_advantages: bool = True


@register(PPOGAEConfig)
class PPOGAE(Algorithm):
    needs_critic = True

    def prepare(self, rollouts: Rollouts) -> Batch:
        if rollouts.values is None:
            raise ValueError("ppo_gae needs the critic's values in the rollouts (needs_critic=True)")
        mask = rollouts.response_mask.to(rollouts.values.dtype)  # [B, T]
        # r_t = -beta * KL_t, + score at the last token
        rewards = token_rewards(rollouts.kl, rollouts.kl_coef, rollouts.rewards, mask)  # [B, T]
        advantages, returns = gae(rewards, rollouts.values, mask, self.gamma, self.lam)  # [B, T]
        if self.whiten_advantages:
            # A <- (A - mean) / std over valid tokens only: trlx whitens the padded [B, T] block, whose
            # pad zeros enter the mean and variance, so its advantages depend on how much padding a batch has
            advantages = masked_whiten(advantages, mask)
        return Batch(rollouts, {"advantages": advantages, "returns": returns})

    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rollouts = batch.rollouts
        out = policy.forward(rollouts, values=True)
        mask = rollouts.response_mask.to(out.logprobs.dtype)  # [B, T]
        advantages, returns = batch["advantages"], batch["returns"]  # [B, T]
        # L_pg = mean max(-A rho, -A clip(rho, 1 - c, 1 + c)),  rho = exp(log pi - log pi_old)
        pg_loss, pg_stats = clipped_policy_loss(
            out.logprobs, rollouts.logprobs, advantages, mask, self.cliprange
        )
        # L_vf = 0.5 mean max((V - R)^2, (clip(V, V_old - cv, V_old + cv) - R)^2)
        vf_loss, vf_stats = clipped_value_loss(
            out.values, rollouts.values, returns, mask, self.cliprange_value
        )
        loss = pg_loss + self.vf_coef * vf_loss
        stats = {
            **pg_stats,
            **vf_stats,
            "entropy": masked_mean(out.entropy.detach(), mask),
            "advantage_mean": masked_mean(advantages, mask),
            "return_mean": masked_mean(returns, mask),
        }
        return loss, stats
