"""Multi-step PPO: per-token rewards, GAE, whitening and the clipped losses against slow loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from algorithms.base import PolicyOutput
from algorithms.ppo_gae import PPOGAE, PPOGAEConfig, gae, token_rewards
from backbone.batch import Batch, Rollouts
from backbone.losses import clipped_policy_loss, clipped_value_loss
from backbone.sources import Online

# three right-padded responses of lengths 4, 2 and 3 (the second truncated or short, all the same here)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
PAD = 99.0  # garbage on pads: must never reach a valid token


def _with_pads(x: list[list[float]]) -> Tensor:
    t = torch.tensor(x)
    return torch.where(MASK.bool(), t, torch.full_like(t, PAD))


VALUES = _with_pads([[0.5, -0.2, 1.0, 0.3], [2.0, 1.5, 0, 0], [-1.0, 0.0, 0.7, 0]])
REWARDS = _with_pads([[0.1, -0.3, 0.0, 2.0], [-0.5, 1.0, 0, 0], [0.2, 0.2, -1.5, 0]])


def make_algorithm(**overrides) -> PPOGAE:
    return PPOGAE(**overrides)


def make_rollouts(
    logprobs: Tensor,
    mask: Tensor,
    values: Tensor | None = None,
    kl: Tensor | None = None,
    rewards: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Rollouts:
    batch, length = logprobs.shape
    rewards = torch.zeros(batch) if rewards is None else rewards
    return Rollouts(
        prompt_ids=torch.ones(batch, 2, dtype=torch.long),
        prompt_mask=torch.ones(batch, 2, dtype=torch.long),
        response_ids=torch.ones(batch, length, dtype=torch.long) * mask,
        response_mask=mask,
        group=torch.arange(batch),
        logprobs=logprobs,
        ref_logprobs=logprobs.clone(),
        kl=torch.zeros(batch, length) if kl is None else kl,
        scores=rewards,
        rewards=rewards,
        kl_coef=kl_coef,
        values=values,
    )


# --------------------------------------------------------------------------- GAE


def reference_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    """Row by row from the recursion, over each row's valid tokens only."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    returns = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        next_advantage = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1].item() if t + 1 < length else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_advantage = delta + gamma * lam * next_advantage
            advantages[b, t] = next_advantage
            returns[b, t] = next_advantage + values[b, t].item()
    return advantages, returns


@pytest.mark.parametrize(("gamma", "lam"), [(0.9, 0.8), (1.0, 0.95), (0.99, 1.0)])
def test_gae_matches_recursion_with_padding(gamma, lam):
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma, lam)
    expected_a, expected_r = reference_gae(REWARDS, VALUES, MASK, gamma, lam)
    torch.testing.assert_close(advantages.double(), expected_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(returns.double(), expected_r, rtol=1e-6, atol=1e-6)
    assert (advantages[MASK == 0] == 0).all() and (returns[MASK == 0] == 0).all()


def test_gae_one_step_by_hand():
    # one row [r0, r1], values [v0, v1]: A1 = r1 - v1; A0 = r0 + g v1 - v0 + g l A1
    advantages, returns = gae(
        torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 0.5, 0.5
    )
    a1 = 2.0 - 0.25
    a0 = 1.0 + 0.5 * 0.25 - 0.5 + 0.25 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.25]]))


# --------------------------------------------------------------------------- prepare


KL = torch.tensor([[0.2, -0.1, 0.4, 0.3], [1.0, 0.5, 0.0, 0.0], [0.0, 0.3, 0.6, 0.0]])
SCORES = torch.tensor([1.5, -2.0, 0.7])
BETA = 0.1


def test_token_rewards_put_score_on_last_valid_token():
    rewards = token_rewards(KL, BETA, SCORES, MASK)
    for b in range(3):
        last = int(MASK[b].sum()) - 1
        for t in range(4):
            expected = -BETA * KL[b, t].item() if MASK[b, t] else 0.0
            if t == last:
                expected += SCORES[b].item()
            assert rewards[b, t].item() == pytest.approx(expected)


def test_prepare_returns_are_reward_to_go_without_whitening():
    # gamma = lam = 1 and V = 0: R_t = sum_{s >= t} r_s over the row's valid tokens
    algorithm = make_algorithm(gamma=1.0, lam=1.0, whiten_advantages=False)
    values = torch.zeros(3, 4)
    batch = algorithm.prepare(make_rollouts(torch.zeros(3, 4), MASK, values, KL, SCORES, BETA))
    for b in range(3):
        length = int(MASK[b].sum())
        for t in range(4):
            to_go = sum(-BETA * KL[b, s].item() for s in range(t, length)) + SCORES[b].item()
            expected = to_go if t < length else 0.0
            assert batch["returns"][b, t].item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(batch["advantages"], batch["returns"])


def test_prepare_gae_and_masked_whitening():
    algorithm = make_algorithm(gamma=0.9, lam=0.8, whiten_advantages=True)
    batch = algorithm.prepare(make_rollouts(torch.zeros(3, 4), MASK, VALUES, KL, SCORES, BETA))
    rewards = token_rewards(KL, BETA, SCORES, MASK)
    raw_a, expected_r = reference_gae(rewards, VALUES, MASK, 0.9, 0.8)
    torch.testing.assert_close(batch["returns"].double(), expected_r, rtol=1e-6, atol=1e-6)
    valid = [raw_a[b, t].item() for b in range(3) for t in range(4) if MASK[b, t]]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((a - mean) ** 2 for a in valid) / len(valid))
    adv = batch["advantages"]
    for b in range(3):
        for t in range(4):
            expected = (raw_a[b, t].item() - mean) / std if MASK[b, t] else 0.0
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
    valid_adv = adv[MASK.bool()]
    assert valid_adv.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid_adv.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_prepare_needs_values():
    with pytest.raises(ValueError, match="values"):
        make_algorithm().prepare(make_rollouts(torch.zeros(3, 4), MASK))


# --------------------------------------------------------------------------- clipped losses

LOGP = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -5.0, 3.0], [-0.7, -0.7, -0.2, 8.0]])
# the last pad's log-ratio of 108 overflows exp in float32: pads must be masked before exp, not after
OLD_LOGP = torch.tensor([[-1.5, -0.5, -1.0, -0.12], [-0.3, -0.9, 1.0, -3.0], [-0.2, -1.0, -0.25, -100.0]])
ADV = torch.tensor([[1.0, -0.5, 2.0, -1.0], [0.3, 1.5, 7.0, -7.0], [-2.0, 0.8, -0.4, 5.0]])
CLIP = 0.2


def reference_policy_loss(logp, old_logp, adv, mask, cliprange):
    terms, clipped, approx_kl, ratios = [], [], [], []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            log_ratio = logp[b, t].item() - old_logp[b, t].item()
            ratio = math.exp(log_ratio)
            a = adv[b, t].item()
            unclipped = -a * ratio
            clip = -a * min(max(ratio, 1 - cliprange), 1 + cliprange)
            terms.append(max(unclipped, clip))
            clipped.append(float(clip > unclipped))
            approx_kl.append(ratio - 1 - log_ratio)
            ratios.append(ratio)
    n = len(terms)
    return sum(terms) / n, sum(clipped) / n, sum(approx_kl) / n, sum(ratios) / n


def test_clipped_policy_loss_matches_loop():
    loss, stats = clipped_policy_loss(LOGP, OLD_LOGP, ADV, MASK, CLIP)
    expected_loss, clipfrac, approx_kl, ratio_mean = reference_policy_loss(LOGP, OLD_LOGP, ADV, MASK, CLIP)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert stats["policy_loss"] == pytest.approx(expected_loss, rel=1e-5)
    # ratios 1.65 (A > 0) and 0.61 (A > 0, A < 0) leave the range; the pads would clip too but must not count
    assert 0 < clipfrac < 1
    assert stats["clipfrac"] == pytest.approx(clipfrac)
    assert stats["approx_kl"] == pytest.approx(approx_kl, rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx(ratio_mean, rel=1e-5)


def test_first_ratio_is_one():
    loss, stats = clipped_policy_loss(OLD_LOGP, OLD_LOGP, ADV, MASK, CLIP)
    valid = ADV[MASK.bool()]
    assert loss.item() == pytest.approx(-valid.mean().item(), rel=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0


VALUES_NEW = torch.tensor([[0.5, 1.0, -0.3, 2.0], [0.0, 0.4, 50.0, 50.0], [1.2, -1.0, 0.1, -50.0]])
RETURNS = torch.tensor([[1.0, 0.2, 0.0, 1.5], [0.5, 0.3, 0.0, 0.0], [2.0, -2.0, 0.3, 0.0]])
CLIP_V = 0.2


def reference_value_loss(values, old_values, returns, mask, cliprange_value):
    terms, clipped, vs, residuals, rs = [], [], [], [], []
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if not mask[b, t]:
                continue
            v, v_old, r = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clip = min(max(v, v_old - cliprange_value), v_old + cliprange_value)
            unclipped, clip = (v - r) ** 2, (v_clip - r) ** 2
            terms.append(max(unclipped, clip))
            clipped.append(float(clip > unclipped))
            vs.append(v)
            residuals.append(r - v)
            rs.append(r)

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    n = len(terms)
    return 0.5 * sum(terms) / n, sum(clipped) / n, sum(vs) / n, 1 - var(residuals) / var(rs)


def test_clipped_value_loss_matches_loop():
    loss, stats = clipped_value_loss(VALUES_NEW, VALUES, RETURNS, MASK, CLIP_V)
    expected_loss, clipfrac, value_mean, explained = reference_value_loss(
        VALUES_NEW, VALUES, RETURNS, MASK, CLIP_V
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert 0 < clipfrac < 1
    assert stats["value_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert stats["value_clipfrac"] == pytest.approx(clipfrac)
    assert stats["value_mean"] == pytest.approx(value_mean, rel=1e-5)
    assert stats["explained_variance"] == pytest.approx(explained, rel=1e-5)


# --------------------------------------------------------------------------- PPOGAE.loss


class FakePolicy:
    """Returns stored leaf tensors, so the test can check where gradients flow."""

    def __init__(self, logprobs: Tensor, values: Tensor):
        self.logprobs = logprobs.clone().requires_grad_(True)
        self.values = values.clone().requires_grad_(True)
        self.entropy = torch.full_like(logprobs, 0.7)

    def forward(self, rollouts: Rollouts, values: bool = False) -> PolicyOutput:
        assert values, "ppo_gae must ask for values"
        return PolicyOutput(self.logprobs, self.entropy, self.values)


def test_loss_combines_terms_and_produces_gradients():
    algorithm = make_algorithm(vf_coef=0.5)
    rollouts = make_rollouts(OLD_LOGP, MASK, VALUES, KL, SCORES, BETA)
    batch = Batch(rollouts, {"advantages": ADV, "returns": RETURNS})
    policy = FakePolicy(LOGP, VALUES_NEW)
    loss, stats = algorithm.loss(policy, batch)

    pg, clipfrac, _, _ = reference_policy_loss(LOGP, OLD_LOGP, ADV, MASK, algorithm.cliprange)
    vf, *_ = reference_value_loss(VALUES_NEW, VALUES, RETURNS, MASK, algorithm.cliprange_value)
    assert loss.item() == pytest.approx(pg + 0.5 * vf, rel=1e-5)
    assert set(stats) == {
        "policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "entropy",
        "ratio_mean", "value_mean", "explained_variance", "advantage_mean", "return_mean",
    }  # fmt: skip
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())  # read once per update
    assert stats["entropy"] == pytest.approx(0.7)
    assert stats["clipfrac"] == pytest.approx(clipfrac)
    assert stats["advantage_mean"] == pytest.approx(ADV[MASK.bool()].mean().item())
    assert stats["return_mean"] == pytest.approx(RETURNS[MASK.bool()].mean().item())

    loss.backward()
    for leaf in (policy.logprobs, policy.values):
        assert leaf.grad is not None
        assert leaf.grad[MASK.bool()].abs().sum() > 0
        assert (leaf.grad[~MASK.bool()] == 0).all()


def test_the_schema_holds_the_defaults_once():
    algorithm = PPOGAE()
    assert algorithm.source == Online(1) and algorithm.needs_critic
    assert algorithm.lam == PPOGAEConfig.lam and algorithm.whiten_advantages is PPOGAEConfig.whiten_advantages
