"""KL estimators against their definitions; KL controllers against their update rules."""

from __future__ import annotations

import math

import pytest
import torch

from backbone.kl import (
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    exact_kl,
    kl_estimate,
)

LOGP = torch.tensor([[-1.0, -2.5, -0.1], [-3.0, -0.7, -4.0]])
REF = torch.tensor([[-1.5, -2.0, -0.1], [-1.0, -0.9, -0.2]])


def _reference(estimator: str, lp: float, ref: float) -> float:
    x = lp - ref
    return {"k1": x, "k2": x * x / 2, "k3": math.exp(-x) - 1 + x}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_match_definitions(estimator):
    got = kl_estimate(LOGP, REF, estimator)
    assert got.shape == LOGP.shape
    for b in range(LOGP.shape[0]):
        for t in range(LOGP.shape[1]):
            expected = _reference(estimator, LOGP[b, t].item(), REF[b, t].item())
            assert got[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_k3_never_negative():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(10_000, generator=gen) * 1e-4,  # near 0, where exp(-x) - 1 + x cancels
            torch.randn(10_000, generator=gen) * 5,
            torch.tensor([-80.0, -30.0, 0.0, 30.0, 80.0, 1e4, -1e-7, 1e-7]),
        ]
    )
    k3 = kl_estimate(x, torch.zeros_like(x), "k3")
    assert (k3 >= 0).all()
    assert torch.isfinite(k3[x > -80]).all()
    assert kl_estimate(x, torch.zeros_like(x), "k2").min() >= 0


def test_estimates_are_zero_when_policies_agree():
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(LOGP, LOGP, estimator), torch.zeros_like(LOGP))


def test_unknown_estimator():
    with pytest.raises(ValueError, match=r"k4.*k1"):
        kl_estimate(LOGP, REF, "k4")


def test_fixed_controller_is_constant():
    ctl = FixedKLController(0.05)
    for current in (0.0, 1.0, 100.0):
        ctl.update(current, n_steps=32)
        assert ctl.value == 0.05


def test_adaptive_controller_follows_update_rule():
    coef, target, horizon, n_steps = 0.1, 6.0, 1000, 64
    ctl = AdaptiveKLController(coef, target, horizon)
    beta = coef
    # far above (clipped to +0.2), slightly above, at target, slightly below, far below (clipped to -0.2)
    for current in (30.0, 6.6, 6.0, 5.4, 0.0, 12.0):
        error = current / target - 1
        error = 0.2 if error > 0.2 else -0.2 if error < -0.2 else error
        beta = beta * (1 + error * n_steps / horizon)
        ctl.update(current, n_steps)
        assert ctl.value == pytest.approx(beta, rel=1e-12)
    # the clip makes a huge overshoot move beta exactly like a 20% one
    a, b = AdaptiveKLController(1.0, 1.0, 10), AdaptiveKLController(1.0, 1.0, 10)
    a.update(1.2, 1)
    b.update(1e6, 1)
    assert a.value == pytest.approx(b.value) == pytest.approx(1.02)


def test_build_and_state_dict():
    assert isinstance(build_kl_controller(0.05, None, 10000), FixedKLController)
    adaptive = build_kl_controller(0.05, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    adaptive.update(12.0, 500)
    restored = build_kl_controller(0.05, 6.0, 10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value != 0.05


def test_exact_kl_against_a_loop_over_the_vocabulary():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)  # [B, T, V]
    logq = torch.log_softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    kl = exact_kl(logp, logq)
    for b in range(2):
        for t in range(3):
            expected = sum(math.exp(logp[b, t, v]) * (logp[b, t, v] - logq[b, t, v]) for v in range(5))
            assert float(kl[b, t]) == pytest.approx(float(expected), rel=1e-12)
    assert torch.all(kl >= 0) and torch.all(exact_kl(logp, logp) == 0)
