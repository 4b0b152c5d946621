"""From reward-model scores to RL rewards: missing-EOS penalty, normalisation, clipping.

The reward model's forward pass produces one raw score per response; this module turns a
batch of them into the rewards every algorithm optimises (``Rollouts.rewards``), in order:

1. penalty: a response that never emitted EOS loses ``missing_eos_penalty`` (trl);
2. normalisation: ``none``; ``rm_stats``, the reward model's mean/std of scores on chosen
   responses (alpaca-rlhf); or ``running``, the running mean/std of every RL score so far
   (Secrets of RLHF's "historical" statistics);
3. clipping to [-clip, clip], in normalised units (Secrets of RLHF; trlx clips raw scores).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from backbone.ops import global_masked_mean_var

NORMALIZE_MODES = ("none", "rm_stats", "running")
KL_COEF_UNITS = ("reward", "reward_std")


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars, merged batch by batch.

    Parallel-variance merge (Chan et al. 1979) of the stored (count, mean, var) with a batch's
    (n, mean_b, var_b), delta = mean_b - mean:

        mean <- mean + delta * n / (count + n)
        var  <- (var * count + var_b * n + delta^2 * count * n / (count + n)) / (count + n)

    ``var`` is the population variance; ``std`` is the sample (Bessel-corrected) one, as in
    trlx. Under torch.distributed a batch is the union of every rank's batch, so all ranks keep
    identical statistics (every rank must call ``update``).
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self.var = 0.0

    @property
    def std(self) -> float:
        """Sample standard deviation; 0 until two values are seen."""
        if self.count < 2:
            return 0.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, xs: Tensor) -> None:
        xs = xs.detach().double().flatten()
        batch_mean, batch_var = global_masked_mean_var(xs, torch.ones_like(xs))
        n = torch.tensor(float(xs.numel()), dtype=torch.float64, device=xs.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
        n_b, mean_b, var_b = n.item(), batch_mean.item(), batch_var.item()
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.var = (self.var * self.count + var_b * n_b + delta**2 * self.count * n_b / total) / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = float(state["count"]), float(state["mean"]), float(state["var"])


class RewardShaper:
    """Scores [B] and whether each response ended with EOS [B] -> rewards [B] (see module doc)."""

    def __init__(
        self,
        normalize: str,
        clip: float | None,
        missing_eos_penalty: float | None,
        rm_mean: float = 0.0,
        rm_std: float = 1.0,
    ):
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown reward normalisation {normalize!r}; expected one of {NORMALIZE_MODES}")
        if normalize == "rm_stats" and not rm_std > 0:
            raise ValueError(f"rm_stats normalisation needs rm_std > 0, got {rm_std}")
        self.normalize = normalize
        self.clip = clip
        self.missing_eos_penalty = missing_eos_penalty
        self.rm_mean = rm_mean
        self.rm_std = rm_std
        self.running = RunningMoments()

    @property
    def reward_std(self) -> float:
        """The spread of a score in the reward's units: the reward model's own standard deviation of
        chosen scores without normalisation, 1 after it (both modes scale to unit std)."""
        return self.rm_std if self.normalize == "none" else 1.0

    def kl_coef(self, coef: float, units: str) -> float:
        """beta in the reward's units: ``coef`` as it is (``reward``), or ``coef`` reward standard
        deviations (``reward_std``): beta = coef * reward_std."""
        if units not in KL_COEF_UNITS:
            raise ValueError(f"kl.coef_units={units!r}: expected one of {KL_COEF_UNITS}")
        return coef * self.reward_std if units == "reward_std" else coef

    @torch.no_grad()
    def __call__(
        self, scores: Tensor, ended_with_eos: Tensor, update: bool = True, sampled: Tensor | None = None
    ) -> Tensor:
        """Shaped rewards, [B]; ``update=False`` (evaluation) reads the running statistics without
        adding to them, and only the ``sampled`` rows [B] (None: all) join them: responses taken from
        data are not the policy's."""
        rewards = scores.detach().float()  # [B]
        if self.missing_eos_penalty is not None:
            rewards = rewards - self.missing_eos_penalty * (~ended_with_eos.bool()).float()
        if self.normalize == "rm_stats":
            rewards = (rewards - self.rm_mean) / self.rm_std
        elif self.normalize == "running":
            # the batch joins the statistics before it is normalised, so the first batch is scaled by
            # its own mean/std rather than by empty statistics; a std of 0 (one score so far, or all
            # equal) leaves the centred rewards, all 0, as they are
            if update and (sampled is None or bool(sampled.any())):
                self.running.update(rewards if sampled is None else rewards[sampled])
            rewards = (rewards - self.running.mean) / max(self.running.std, 1e-8)
        if self.clip is not None:
            rewards = rewards.clamp(-self.clip, self.clip)
        return rewards

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"running": self.running.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.running.load_state_dict(state["running"])
