"""KL between the policy and the reference: per-token estimators and the coefficient controllers.

Estimators (Schulman, http://joschu.net/blog/kl-approx.html) of KL(pi || pi_ref) from tokens
sampled by pi, on x = log pi(token) - log pi_ref(token):

    k1 = x                      unbiased, high variance, can be negative
    k2 = x^2 / 2                biased, low variance, never negative
    k3 = exp(-x) - 1 + x        unbiased, low variance, never negative

Controllers set beta, the weight of the per-token KL penalty in the reward: fixed, or adaptive
(Ziegler et al. 2019, as in trlx) steering the measured KL toward a target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor


def _k1(x: Tensor) -> Tensor:
    return x


def _k2(x: Tensor) -> Tensor:
    return 0.5 * x.pow(2)


def _k3(x: Tensor) -> Tensor:
    # expm1 avoids the cancellation of exp(-x) - 1 near x = 0 (which goes negative for small |x|);
    # the clamp keeps the guarantee where expm1 is not correctly rounded (low precision, fast math)
    return (torch.expm1(-x) + x).clamp(min=0)


ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate, elementwise on x = logprobs - ref_logprobs (mask pads yourself)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[estimator](logprobs - ref_logprobs)


def exact_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """KL(pi || pi_ref) at each position, summed over the vocabulary instead of estimated from the
    sampled token: sum_v pi(v) (log pi(v) - log pi_ref(v)). Full log-prob tables [B, T, V] -> [B, T].

    It is never negative, whatever the sampled tokens, so it shows what a k1 estimate that goes
    negative under constrained sampling hides."""
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


class KLController(ABC):
    """Holds beta (``value``); ``update`` is called with the measured KL after each update phase."""

    def __init__(self, coef: float):
        self.value = float(coef)

    @abstractmethod
    def update(self, current: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(KLController):
    """beta stays at its initial value."""

    def update(self, current: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController(KLController):
    """Proportional controller on log beta (Ziegler et al. 2019):

        e = clip(current / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    The clip bounds how fast beta moves when the KL is far from the target.
    """

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def build_kl_controller(coef: float, target: float | None, horizon: int) -> KLController:
    """Adaptive iff a target KL is given (KLConfig: ``coef``, ``target``, ``horizon``)."""
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)
