"""RLOO's KL-penalised sequence reward, leave-one-out advantages and REINFORCE loss, checked against
direct loops on hand-made tensors with padding; its config, as composed and as checked."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakePolicy, compose_config
from hydra.utils import instantiate

from algorithms.rloo import RLOO, RLOOConfig, reinforce_loss
from backbone.batch import Rollouts
from backbone.sources import Online
from backbone.validation import check_run_config

T = 5
# three prompts, interleaved, of 3, 4 and 2 samples (the loss accepts groups of different sizes)
GROUP = torch.tensor([5, 1, 5, 1, 1, 7, 7, 5, 1])
LENGTHS = [3, 5, 1, 4, 5, 2, 5, 3, 4]


def mask_of(lengths: list[int]) -> torch.Tensor:  # [B, T]
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


def make_rollouts(group: torch.Tensor = GROUP, kl_coef: float = 0.1) -> Rollouts:
    g = torch.Generator().manual_seed(0)
    b = len(group)
    return Rollouts(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.ones(b, T, dtype=torch.long),
        response_mask=mask_of(LENGTHS),
        group=group,
        logprobs=-torch.rand(b, T, generator=g) - 0.5,
        ref_logprobs=-torch.rand(b, T, generator=g) - 0.5,
        kl=torch.rand(b, T, generator=g),  # garbage on pads too: only valid tokens may count
        scores=torch.randn(b, generator=g),
        rewards=torch.randn(b, generator=g),
        kl_coef=kl_coef,
    )


def make_algo(**kwargs) -> RLOO:
    return RLOO(name="rloo", lr=1e-4, minibatch_size=8, **kwargs)


def moved_logprobs(rollouts: Rollouts) -> torch.Tensor:
    """The current policy's log-probs, away from the sampling policy's; garbage on pads (must not count)."""
    g = torch.Generator().manual_seed(1)
    logprobs = rollouts.logprobs + 0.6 * torch.randn(rollouts.logprobs.shape, generator=g)
    return torch.where(rollouts.response_mask.bool(), logprobs, torch.full_like(logprobs, 50.0))


# --------------------------------------------------------------------------- references (loops)


def ref_seq_rewards(r: Rollouts) -> list[float]:
    """R_i = r_i - beta * sum of kl over i's valid tokens."""
    return [
        r.rewards[i].item() - r.kl_coef * sum(r.kl[i, t].item() for t in range(LENGTHS[i]))
        for i in range(len(r))
    ]


def ref_advantages(seq: list[float], group: list[int]) -> list[float]:
    """A_i = R_i - the mean of R over the other samples of i's prompt."""
    out = []
    for i in range(len(seq)):
        others = [seq[j] for j in range(len(seq)) if group[j] == group[i] and j != i]
        out.append(seq[i] - sum(others) / len(others))
    return out


def ref_loss(logprobs, adv: list[float]) -> float:
    """-(1 / B) sum_i A_i * sum_t log pi(y_{i,t}) over valid tokens."""
    total = 0.0
    for i, n in enumerate(LENGTHS):
        total += adv[i] * sum(logprobs[i, t].item() for t in range(n))
    return -total / len(LENGTHS)


# --------------------------------------------------------------------------- advantages


@pytest.mark.parametrize(
    "group", [GROUP, torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])], ids=["unequal", "equal"]
)
def test_advantage_is_the_kl_penalised_reward_minus_the_others_mean(group):
    rollouts = make_rollouts(group, kl_coef=0.3)
    batch = make_algo().prepare(rollouts)
    seq = ref_seq_rewards(rollouts)
    expected = ref_advantages(seq, group.tolist())
    torch.testing.assert_close(batch["seq_rewards"], torch.tensor(seq))
    torch.testing.assert_close(batch["advantages"], torch.tensor(expected))
    torch.testing.assert_close(batch["baselines"], torch.tensor([s - a for s, a in zip(seq, expected)]))
    for g in set(group.tolist()):  # A_i = k / (k - 1) (R_i - mean_g R): the advantages of a prompt sum to 0
        assert batch["advantages"][group == g].sum().item() == pytest.approx(0.0, abs=1e-5)


def test_whitening_is_optional_and_logs_the_raw_advantages():
    rollouts = make_rollouts()
    raw = ref_advantages(ref_seq_rewards(rollouts), GROUP.tolist())
    mean = sum(raw) / len(raw)
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / len(raw))
    for whiten in (False, True):
        batch = make_algo(whiten_advantages=whiten).prepare(rollouts)
        expected = [(a - mean) / std for a in raw] if whiten else raw
        torch.testing.assert_close(batch["advantages"], torch.tensor(expected))
        assert batch.stats["advantage_mean"].item() == pytest.approx(mean, abs=1e-6)
        assert batch.stats["advantage_std"].item() == pytest.approx(std, rel=1e-5)


# --------------------------------------------------------------------------- loss


def test_reinforce_loss_matches_loop_and_ignores_the_sampling_policy():
    """No ratio, no clip: the loss is the same whatever log pi_old is, however far pi has moved."""
    rollouts = make_rollouts()
    algo = make_algo()
    batch = algo.prepare(rollouts)
    logprobs = moved_logprobs(rollouts)
    loss, stats = algo.loss(FakePolicy(logprobs), batch)
    assert loss.item() == pytest.approx(ref_loss(logprobs, batch["advantages"].tolist()), rel=1e-5)
    rollouts.logprobs = rollouts.logprobs - 3.0  # a sampling policy far away
    assert algo.loss(FakePolicy(logprobs), batch)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    mask = rollouts.response_mask.bool()
    assert stats["approx_kl"].item() > 0
    assert stats["policy_loss"].item() == pytest.approx(loss.item())
    assert stats["baseline_mean"].item() == pytest.approx(batch["baselines"].mean().item())
    assert stats["sequence_reward_mean"].item() == pytest.approx(batch["seq_rewards"].mean().item())
    assert "entropy" in stats and "clipfrac" not in stats
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    assert reinforce_loss(logprobs, mask.float(), batch["advantages"]).item() == pytest.approx(loss.item())


def test_gradient_is_the_advantage_on_every_valid_token_and_zero_on_pads():
    """dL/dlogp_{i,t} = -A_i / B on each valid token of i, whatever its length (the whole response is
    one action), and 0 on pads."""
    rollouts = make_rollouts()
    algo = make_algo()
    batch = algo.prepare(rollouts)
    policy = FakePolicy(moved_logprobs(rollouts))
    algo.loss(policy, batch)[0].backward()
    for i, n in enumerate(LENGTHS):
        a = batch["advantages"][i].item()
        for t in range(T):
            expected = -a / len(LENGTHS) if t < n else 0.0
            assert policy.logprobs.grad[i, t].item() == pytest.approx(expected, abs=1e-7)


def test_approx_kl_measures_how_far_pi_moved_from_the_sampling_policy():
    rollouts = make_rollouts()
    algo = make_algo()
    batch = algo.prepare(rollouts)
    logprobs = moved_logprobs(rollouts)
    stats = algo.loss(FakePolicy(logprobs), batch)[1]
    terms = []
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            x = logprobs[i, t].item() - rollouts.logprobs[i, t].item()
            terms.append(math.exp(x) - 1 - x)
    assert stats["approx_kl"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert algo.loss(FakePolicy(rollouts.logprobs), batch)[1]["approx_kl"].item() == pytest.approx(
        0, abs=1e-7
    )


# --------------------------------------------------------------------------- config


def test_the_schema_holds_the_defaults_once():
    algo = RLOO()
    assert algo.samples_per_prompt == RLOOConfig.samples_per_prompt
    assert algo.source == Online(RLOOConfig.samples_per_prompt)
    assert algo.ppo_epochs == 1 and algo.whiten_advantages is False and not algo.needs_critic


def test_one_sample_per_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        make_algo(samples_per_prompt=1)


def test_algorithm_rloo_composes_and_passes_the_run_checks():
    cfg = compose_config(["algorithm=rloo", "kl.estimator=k3"])  # any shaping estimator is RLOO's kl
    algo = instantiate(cfg.algorithm)
    assert isinstance(algo, RLOO)
    check_run_config(cfg, algo)


def test_check_refuses_a_second_epoch():
    cfg = compose_config(["algorithm=rloo", "algorithm.ppo_epochs=2"])
    with pytest.raises(ValueError, match=r"algorithm\.ppo_epochs=2: rloo is REINFORCE, on-policy"):
        check_run_config(cfg, instantiate(cfg.algorithm))
