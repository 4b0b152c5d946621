"""GRPO's group normalisation, surrogate, k3 term and aggregations, checked against direct loops on
hand-made tensors with padding; its config, as composed and as checked."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakePolicy, compose_config
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from algorithms.grpo import EPS, GRPO, GRPOConfig, group_std
from backbone.batch import Rollouts
from backbone.sources import Online
from backbone.validation import check_run_config

T = 5
MAX_NEW_TOKENS = 8  # the generation budget, wider than the batch's longest response (T)
# three prompts of three samples each, interleaved; group 1 scored its samples alike (no signal)
GROUP = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])
REWARDS = torch.tensor([0.3, -1.0, 0.7, 0.5, 1.7, 0.7, 0.7, 3.0, -2.2])
LENGTHS = [3, 5, 1, 4, 5, 2, 5, 3, 4]
LOSS_TYPES = ["grpo", "token", "dr_grpo"]


def mask_of(lengths: list[int]) -> torch.Tensor:  # [B, T]
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


def make_rollouts(kl_coef: float = 0.1) -> Rollouts:
    g = torch.Generator().manual_seed(0)
    b = len(GROUP)
    mask = mask_of(LENGTHS)
    return Rollouts(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.ones(b, T, dtype=torch.long),
        response_mask=mask,
        group=GROUP,
        logprobs=-torch.rand(b, T, generator=g) - 0.5,
        ref_logprobs=torch.where(mask.bool(), -torch.rand(b, T, generator=g) - 0.5, -80.0),  # garbage on pads
        kl=torch.rand(b, T, generator=g),  # GRPO reads no shaping KL
        scores=REWARDS.clone(),
        rewards=REWARDS,
        kl_coef=kl_coef,
    )


def make_algo(**kwargs) -> GRPO:
    return GRPO(name="grpo", lr=1e-4, minibatch_size=8, max_new_tokens=MAX_NEW_TOKENS, **kwargs)


def moved_logprobs(rollouts: Rollouts, spread: float = 0.6) -> torch.Tensor:
    """The current policy's log-probs, ratios well beyond [0.8, 1.2]; garbage on pads (must not count)."""
    g = torch.Generator().manual_seed(1)
    logprobs = rollouts.logprobs + spread * torch.randn(rollouts.logprobs.shape, generator=g)
    return torch.where(rollouts.response_mask.bool(), logprobs, torch.full_like(logprobs, 50.0))


# --------------------------------------------------------------------------- references (loops)


def ref_group_stats(rewards: list[float], group: list[int], i: int) -> tuple[float, float]:
    """Mean and unbiased std of the rewards of i's group."""
    members = [rewards[j] for j in range(len(rewards)) if group[j] == group[i]]
    mean = sum(members) / len(members)
    return mean, math.sqrt(sum((r - mean) ** 2 for r in members) / (len(members) - 1))


def ref_advantages(rewards: list[float], group: list[int], scale: bool) -> list[float]:
    out = []
    for i in range(len(rewards)):
        mean, std = ref_group_stats(rewards, group, i)
        out.append((rewards[i] - mean) / (std + 1e-4) if scale else rewards[i] - mean)
    return out


def ref_k3(lp: float, ref: float) -> float:
    return math.exp(ref - lp) - (ref - lp) - 1


def ref_token_terms(r: Rollouts, lp, adv: list[float], eps: float, beta: float) -> list[list[float]]:
    """l_{i,t} = max(-A rho, -A clip(rho)) + beta * k3 on each valid token of each response."""
    terms = []
    for i in range(len(r)):
        row = []
        for t in range(int(r.response_mask[i].sum())):
            rho = math.exp(lp[i, t].item() - r.logprobs[i, t].item())
            surrogate = max(-adv[i] * rho, -adv[i] * min(max(rho, 1 - eps), 1 + eps))
            row.append(surrogate + beta * ref_k3(lp[i, t].item(), r.ref_logprobs[i, t].item()))
        terms.append(row)
    return terms


def ref_aggregate(terms: list[list[float]], loss_type: str) -> float:
    if loss_type == "grpo":
        return sum(sum(row) / len(row) for row in terms) / len(terms)
    total = sum(sum(row) for row in terms)
    if loss_type == "token":
        return total / sum(len(row) for row in terms)
    return total / (len(terms) * MAX_NEW_TOKENS)


# --------------------------------------------------------------------------- advantages


def test_group_std_is_torch_unbiased_std_on_unequal_groups():
    group = torch.tensor([5, 1, 5, 1, 1, 7, 7, 5, 1])  # sizes 3, 4, 2
    rewards = torch.arange(9, dtype=torch.float32) ** 1.5
    expected = [ref_group_stats(rewards.tolist(), group.tolist(), i)[1] for i in range(9)]
    torch.testing.assert_close(group_std(rewards, group), torch.tensor(expected))
    torch.testing.assert_close(group_std(rewards, group)[5], rewards[group == 7].std())


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_advantage_is_the_group_normalised_reward(scale_rewards):
    rollouts = make_rollouts()
    batch = make_algo(scale_rewards=scale_rewards).prepare(rollouts)
    expected = ref_advantages(REWARDS.tolist(), GROUP.tolist(), scale=scale_rewards == "group")
    torch.testing.assert_close(batch["advantages"], torch.tensor(expected))
    assert EPS == 1e-4  # TRL's, outside the square root
    # no KL in the reward: the shaping KL and beta change nothing
    torch.testing.assert_close(
        make_algo(scale_rewards=scale_rewards).prepare(make_rollouts(5.0))["advantages"], batch["advantages"]
    )


def test_batch_statistics_count_the_groups_without_signal():
    batch = make_algo().prepare(make_rollouts())
    adv = batch["advantages"].tolist()
    mean = sum(adv) / len(adv)
    assert batch.stats["advantage_mean"].item() == pytest.approx(mean, abs=1e-6)
    assert batch.stats["advantage_std"].item() == pytest.approx(
        math.sqrt(sum((a - mean) ** 2 for a in adv) / len(adv)), rel=1e-5
    )
    stds = {
        g: ref_group_stats(REWARDS.tolist(), GROUP.tolist(), GROUP.tolist().index(g))[1] for g in (0, 1, 2)
    }
    assert stds[1] == 0  # group 1 scored 0.7 three times
    assert batch.stats["zero_std_frac"].item() == pytest.approx(1 / 3)
    assert batch.stats["group_reward_std"].item() == pytest.approx(sum(stds.values()) / 3, rel=1e-5)
    assert [a for a, g in zip(adv, GROUP.tolist()) if g == 1] == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_matches_loop_with_pads_clipped_ratios_and_k3(loss_type):
    rollouts = make_rollouts(kl_coef=0.3)
    algo = make_algo(loss_type=loss_type, cliprange=0.2)
    batch = algo.prepare(rollouts)
    logprobs = moved_logprobs(rollouts)
    loss, stats = algo.loss(FakePolicy(logprobs), batch)
    adv = batch["advantages"].tolist()
    expected = ref_aggregate(ref_token_terms(rollouts, logprobs, adv, 0.2, 0.3), loss_type)
    surrogate = ref_aggregate(ref_token_terms(rollouts, logprobs, adv, 0.2, 0.0), loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["policy_loss"].item() == pytest.approx(surrogate, rel=1e-5, abs=1e-7)  # the A_i sum to ~0
    k3 = [
        ref_k3(logprobs[i, t].item(), rollouts.ref_logprobs[i, t].item())
        for i, n in enumerate(LENGTHS)
        for t in range(n)
    ]
    assert stats["kl"].item() == pytest.approx(sum(k3) / len(k3), rel=1e-5)
    assert 0 < stats["clipfrac"].item() < 1  # the case exercises both branches
    assert {"approx_kl", "ratio_mean", "entropy"} <= stats.keys()
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())


def test_the_three_aggregations_differ_on_unequal_lengths():
    rollouts = make_rollouts()
    logprobs = moved_logprobs(rollouts)
    losses = {}
    for loss_type in LOSS_TYPES:
        algo = make_algo(loss_type=loss_type)
        losses[loss_type] = algo.loss(FakePolicy(logprobs), algo.prepare(rollouts))[0].item()
    assert len({round(v, 6) for v in losses.values()}) == 3
    # dr_grpo and token share the sum, and differ by their normalisers: sum_i |o_i| vs B * budget
    assert losses["dr_grpo"] * len(LENGTHS) * MAX_NEW_TOKENS == pytest.approx(losses["token"] * sum(LENGTHS))


def test_dr_grpo_normalises_by_the_budget_not_the_batch_width():
    """Dr. GRPO = scale_rewards=none + loss_type=dr_grpo: widening the tensors with pad columns (the
    width is the batch's longest response) changes nothing."""
    rollouts = make_rollouts()
    algo = make_algo(scale_rewards="none", loss_type="dr_grpo")
    logprobs = moved_logprobs(rollouts)
    loss = algo.loss(FakePolicy(logprobs), algo.prepare(rollouts))[0]
    adv = ref_advantages(REWARDS.tolist(), GROUP.tolist(), scale=False)
    terms = ref_token_terms(rollouts, logprobs, adv, 0.2, rollouts.kl_coef)
    assert loss.item() == pytest.approx(sum(map(sum, terms)) / (len(LENGTHS) * MAX_NEW_TOKENS), rel=1e-5)

    def widen(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.cat([x, torch.full((len(x), 3), fill, dtype=x.dtype)], dim=1)

    wide = Rollouts(
        **{
            **{k: getattr(rollouts, k) for k in ("prompt_ids", "prompt_mask", "group", "scores", "rewards")},
            "response_ids": widen(rollouts.response_ids, 0),
            "response_mask": widen(rollouts.response_mask, 0),
            "logprobs": widen(rollouts.logprobs, -1.0),
            "ref_logprobs": widen(rollouts.ref_logprobs, -1.0),
            "kl": widen(rollouts.kl, 0.0),
            "kl_coef": rollouts.kl_coef,
        }
    )
    wide_loss = algo.loss(FakePolicy(widen(logprobs, 50.0)), algo.prepare(wide))[0]
    assert wide_loss.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_at_ratio_one_is_the_aggregated_advantage_and_k3(loss_type):
    """At rho = 1 (pi = pi_old), dl_{i,t}/dlogp = -A_i + beta * (1 - exp(ref - logp)), times the
    aggregation's weight of the token: 1 / (B |o_i|), 1 / sum |o|, 1 / (B * budget); 0 on pads."""
    rollouts = make_rollouts(kl_coef=0.5)
    algo = make_algo(loss_type=loss_type)
    batch = algo.prepare(rollouts)
    logprobs = torch.where(rollouts.response_mask.bool(), rollouts.logprobs, 50.0)
    policy = FakePolicy(logprobs)
    algo.loss(policy, batch)[0].backward()
    b = len(LENGTHS)
    weight = {
        "grpo": lambda n: 1 / (b * n),
        "token": lambda n: 1 / sum(LENGTHS),
        "dr_grpo": lambda n: 1 / (b * MAX_NEW_TOKENS),
    }[loss_type]
    for i, n in enumerate(LENGTHS):
        a = batch["advantages"][i].item()
        for t in range(T):
            lp, ref = logprobs[i, t].item(), rollouts.ref_logprobs[i, t].item()
            expected = (-a + 0.5 * (1 - math.exp(ref - lp))) * weight(n) if t < n else 0.0
            assert policy.logprobs.grad[i, t].item() == pytest.approx(expected, abs=1e-7)


def test_k3_term_pulls_the_policy_toward_the_reference():
    """With no advantage (every group scored alike) the loss is beta * agg(k3) >= 0, and its gradient
    lowers log pi where pi > pi_ref and raises it where pi < pi_ref."""
    rollouts = make_rollouts(kl_coef=0.2)
    rollouts.rewards = torch.zeros_like(REWARDS)
    algo = make_algo()
    batch = algo.prepare(rollouts)
    assert torch.all(batch["advantages"] == 0)
    logprobs = moved_logprobs(rollouts)
    policy = FakePolicy(logprobs)
    loss = algo.loss(policy, batch)[0]
    k3 = [
        [ref_k3(logprobs[i, t].item(), rollouts.ref_logprobs[i, t].item()) for t in range(n)]
        for i, n in enumerate(LENGTHS)
    ]
    assert loss.item() == pytest.approx(0.2 * ref_aggregate(k3, "grpo"), rel=1e-5) and loss.item() > 0
    loss.backward()
    mask = rollouts.response_mask.bool()
    above = (logprobs > rollouts.ref_logprobs) & mask
    below = (logprobs < rollouts.ref_logprobs) & mask
    assert above.any() and below.any()
    assert torch.all(policy.logprobs.grad[above] > 0)  # gradient descent lowers log pi
    assert torch.all(policy.logprobs.grad[below] < 0)
    assert torch.all(policy.logprobs.grad[~mask] == 0)
    # beta is the run's, read off the batch: twice the coefficient, twice the loss
    rollouts.kl_coef = 0.4
    assert algo.loss(FakePolicy(logprobs), algo.prepare(rollouts))[0].item() == pytest.approx(2 * loss.item())


# --------------------------------------------------------------------------- config


def test_the_schema_holds_the_defaults_once():
    algo = GRPO()
    assert algo.samples_per_prompt == GRPOConfig.samples_per_prompt
    assert algo.source == Online(GRPOConfig.samples_per_prompt)
    assert (algo.ppo_epochs, algo.cliprange) == (1, 0.2)  # TRL's num_iterations and epsilon
    assert (algo.scale_rewards, algo.loss_type) == ("group", "grpo")
    assert GRPOConfig.max_new_tokens == "${rollout.max_new_tokens}"
    assert not algo.needs_critic


def test_constructor_validates():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        make_algo(samples_per_prompt=1)
    with pytest.raises(ValidationError, match="expected one of"):
        make_algo(loss_type="dapo")
    with pytest.raises(ValidationError, match="expected one of"):
        make_algo(scale_rewards="batch")


def test_algorithm_grpo_composes_and_its_budget_follows_the_rollout():
    cfg = compose_config(["algorithm=grpo"])
    algo = instantiate(cfg.algorithm)
    assert isinstance(algo, GRPO) and algo.max_new_tokens == cfg.rollout.max_new_tokens
    check_run_config(cfg, algo)
    cfg = compose_config(["algorithm=grpo", "rollout.max_new_tokens=16", "algorithm.loss_type=dr_grpo"])
    algo = instantiate(cfg.algorithm)
    assert algo.max_new_tokens == 16 and algo.loss_type == "dr_grpo"
    check_run_config(cfg, algo)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kl.estimator=k3"], "kl.estimator=k3: grpo puts beta * k3 of the current policy in its loss"),
        (["algorithm.max_new_tokens=30"], "algorithm.max_new_tokens=30: dr_grpo's normaliser is the gen"),
    ],
)
def test_check_names_the_keys_grpo_cannot_honour(overrides, message):
    cfg = compose_config(["algorithm=grpo", *overrides])
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        check_run_config(cfg, instantiate(cfg.algorithm))
