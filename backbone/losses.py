"""The clipped PPO losses (Schulman et al. 2017) over response tokens, shared by both PPO variants and GRPO.

Each returns the scalar loss (a masked mean over valid tokens, or the policy loss's own aggregation
of them, so padding never counts) and its statistics as 0-d tensors, which the trainer reads once
per update (a read per statistic would stall a GPU step on each device-to-host copy). Statistics
are local to the minibatch: no collective call here, since ranks may see different numbers of
minibatches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from backbone.ops import masked_mean


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    aggregate: Callable[[Tensor, Tensor], Tensor] = masked_mean,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_pg = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - c, 1 + c)),  rho_t = pi(a_t) / pi_old(a_t).

    All tensors [B, T]; ``mask`` is 1 on valid response tokens. ``aggregate(per_token, mask)`` reduces
    the per-token terms to the loss: by default the mean over all valid tokens (GRPO offers others);
    the statistics are means over valid tokens whatever it is.
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * mask  # [B, T]; 0 on pads, whose garbage could overflow exp
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_unclipped = -advantages * ratio  # [B, T]
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # [B, T]
    loss = aggregate(torch.max(pg_unclipped, pg_clipped), mask)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            # fraction of tokens whose gradient the clip removed
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(mask.dtype), mask),
            # (rho - 1) - log rho: a non-negative estimate of KL(pi_old || pi)
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_vf = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)  (baselines ppo2).

    All tensors [B, T]; ``mask`` is 1 on valid response tokens.
    """
    mask = mask.to(values.dtype)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)  # [B, T]
    vf_unclipped = (values - returns) ** 2  # [B, T]
    vf_clipped = (values_clipped - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), mask)
    with torch.no_grad():
        stats = {
            "value_loss": loss.detach(),
            "value_clipfrac": masked_mean((vf_clipped > vf_unclipped).to(mask.dtype), mask),
            "value_mean": masked_mean(values, mask),
            # 1 - Var(R - V) / Var(R): 1 for a perfect critic, 0 for one that predicts the mean
            "explained_variance": 1.0 - _masked_var(returns - values, mask) / _masked_var(returns, mask),
        }
    return loss, stats


def _masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of the masked entries of this minibatch."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)
