"""RRHF's ranking and SFT terms, checked against direct loop computations on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import FakePolicy
from omegaconf.errors import ValidationError

from algorithms.rrhf import RRHF, RRHFConfig, best_candidate_sft_loss, length_normalised_logprob, rank_loss
from backbone.batch import Rollouts
from backbone.sources import Frozen, Online

T = 5
# three prompts of four candidates, interleaved; group 0 has a tie for its best reward, group 2 a tie below
GROUP = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 1])
REWARDS = torch.tensor([0.5, -1.0, 2.0, 1.5, 0.3, 0.0, 1.5, 0.7, 0.0, -0.2, 1.0, 0.1])
LENGTHS = [3, 5, 1, 4, 5, 2, 5, 3, 4, 2, 1, 5]


def mask_of(lengths: list[int]) -> torch.Tensor:  # [B, T]
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


def make_logprobs(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Random log-probs on valid tokens, large garbage on pads (which must never count)."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -2 * torch.rand(len(lengths), T, generator=g)
    return torch.where(mask_of(lengths).bool(), logprobs, torch.full_like(logprobs, -100.0))


def make_rollouts(group: torch.Tensor = GROUP, rewards: torch.Tensor = REWARDS) -> Rollouts:
    b = len(group)
    return Rollouts(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.ones(b, T, dtype=torch.long),
        response_mask=mask_of(LENGTHS),
        group=group,
        logprobs=make_logprobs(LENGTHS, seed=1),
        ref_logprobs=make_logprobs(LENGTHS, seed=2),
        kl=torch.zeros(b, T),
        scores=rewards.clone(),
        rewards=rewards,
    )


def make_algo(**kwargs) -> RRHF:
    return RRHF(name="rrhf", lr=1e-5, ppo_epochs=1, minibatch_size=8, **kwargs)


# --------------------------------------------------------------------------- references (loops)


def ref_scores(logprobs, lengths: list[int], length_penalty: float) -> list[float]:
    return [
        sum(logprobs[i, t].item() for t in range(n)) / max(n, 1) ** length_penalty
        for i, n in enumerate(lengths)
    ]


def ref_rank_loss(scores: list[float], rewards: list[float], group: list[int]) -> float:
    total = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if group[i] == group[j] and rewards[i] < rewards[j]:
                total += max(0.0, scores[i] - scores[j])
    return total / len(set(group))


def ref_best(rewards: list[float], group: list[int]) -> list[int]:
    """Row of the best candidate per group, the first one on a tie."""
    best: dict[int, int] = {}
    for i, g in enumerate(group):
        if g not in best or rewards[i] > rewards[best[g]]:
            best[g] = i
    return sorted(best.values())


def ref_sft_loss(logprobs, lengths: list[int], rewards: list[float], group: list[int]) -> float:
    rows = ref_best(rewards, group)
    return sum(-sum(logprobs[i, t].item() for t in range(lengths[i])) / lengths[i] for i in rows) / len(rows)


# --------------------------------------------------------------------------- terms


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
def test_length_normalised_logprob_matches_loop(length_penalty: float):
    lengths = [*LENGTHS, 0]  # an empty row scores 0
    logprobs = make_logprobs(lengths)
    got = length_normalised_logprob(logprobs, mask_of(lengths), length_penalty)
    torch.testing.assert_close(got, torch.tensor(ref_scores(logprobs, lengths, length_penalty)))
    if length_penalty == 0.0:  # the plain sum of log-probs
        torch.testing.assert_close(got[:-1], (logprobs * mask_of(lengths)).sum(dim=1)[:-1])


def test_rank_loss_matches_double_loop_with_ties_and_interleaved_groups():
    scores = torch.tensor([-0.5, -1.2, -0.3, -0.9, -0.4, -0.2, -0.8, -1.5, -0.1, -0.7, -0.6, -0.3])
    expected = ref_rank_loss(scores.tolist(), REWARDS.tolist(), GROUP.tolist())
    assert expected > 0
    assert rank_loss(scores, REWARDS, GROUP).item() == pytest.approx(expected, rel=1e-6)


def test_rank_loss_ties_contribute_nothing():
    scores = torch.tensor([0.0, -3.0, 5.0])
    assert rank_loss(scores, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0])).item() == 0.0


def test_rank_loss_with_two_candidates():
    group = torch.tensor([3, 8, 8, 3])
    rewards = torch.tensor([0.0, 2.0, 1.0, 1.0])
    scores = torch.tensor([-0.2, -1.0, -0.4, -0.7])
    # prompt 3: row 0 (worse) scores above row 3 by 0.5; prompt 8: row 2 (worse) above row 1 by 0.6
    assert rank_loss(scores, rewards, group).item() == pytest.approx((0.5 + 0.6) / 2)
    assert rank_loss(scores, rewards, group).item() == pytest.approx(
        ref_rank_loss(scores.tolist(), rewards.tolist(), group.tolist())
    )
    assert rank_loss(-scores, rewards, group).item() == 0.0  # correctly ordered: no loss


def test_sft_loss_picks_the_best_candidate_per_group_and_ignores_padding():
    logprobs = make_logprobs(LENGTHS)
    got = best_candidate_sft_loss(logprobs, mask_of(LENGTHS), REWARDS, GROUP)
    expected = ref_sft_loss(logprobs, LENGTHS, REWARDS.tolist(), GROUP.tolist())
    assert ref_best(REWARDS.tolist(), GROUP.tolist()) == [2, 3, 7]  # group 0's tie goes to row 3
    assert got.item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- algorithm


def test_the_schema_holds_the_defaults_once():
    algo = RRHF()  # every key from the schema
    assert algo.samples_per_prompt == RRHFConfig.samples_per_prompt == 4
    assert algo.rank_weight == RRHFConfig.rank_weight and algo.sft_weight == algo.length_penalty == 1.0
    assert algo.source == Online(4) and not algo.needs_critic


def test_constructor_validates_mode_and_samples():
    assert make_algo().source == Online(4)
    assert make_algo(mode="offline").source == Frozen(4)
    assert make_algo(include_chosen=True).source == Online(4, with_chosen=True)
    assert not make_algo().needs_critic
    assert make_algo(samples_per_prompt=3).samples_per_prompt == 3
    with pytest.raises(ValidationError, match="expected one of"):
        make_algo(mode="batch")
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        make_algo(samples_per_prompt=1)


@pytest.mark.parametrize(("rank_weight", "sft_weight"), [(1.0, 1.0), (100.0, 1.0), (0.5, 2.0)])
def test_total_loss_weights_the_two_terms(rank_weight: float, sft_weight: float):
    rollouts = make_rollouts()
    algo = make_algo(rank_weight=rank_weight, sft_weight=sft_weight, length_penalty=1.0)
    logprobs = make_logprobs(LENGTHS, seed=3)
    policy = FakePolicy(logprobs)
    loss, stats = algo.loss(policy, algo.prepare(rollouts))
    rewards, group = REWARDS.tolist(), GROUP.tolist()
    scores = ref_scores(logprobs, LENGTHS, 1.0)
    l_rank = ref_rank_loss(scores, rewards, group)
    l_sft = ref_sft_loss(logprobs, LENGTHS, rewards, group)
    assert stats["rank_loss"] == pytest.approx(l_rank, rel=1e-6)
    assert stats["sft_loss"] == pytest.approx(l_sft, rel=1e-6)
    assert loss.item() == pytest.approx(rank_weight * l_rank + sft_weight * l_sft, rel=1e-6)

    pairs = violated = 0
    for i in range(len(group)):
        for j in range(len(group)):
            if group[i] == group[j] and rewards[i] < rewards[j]:
                pairs += 1
                violated += scores[i] > scores[j]
    assert 0 < violated < pairs
    assert stats["rank_violations"] == pytest.approx(violated / pairs)
    best = ref_best(rewards, group)
    assert stats["best_reward_mean"] == pytest.approx(sum(rewards[i] for i in best) / len(best))
    mask = mask_of(LENGTHS).float()
    assert stats["entropy"] == pytest.approx(((policy.entropy * mask).sum() / mask.sum()).item(), rel=1e-6)
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())  # read once per update


def test_sft_gradient_reaches_only_the_best_candidates():
    rollouts = make_rollouts()
    algo = make_algo(rank_weight=0.0, sft_weight=1.0)
    policy = FakePolicy(make_logprobs(LENGTHS, seed=4))
    loss, _ = algo.loss(policy, algo.prepare(rollouts))
    loss.backward()
    best = ref_best(REWARDS.tolist(), GROUP.tolist())
    for i, n in enumerate(LENGTHS):
        for t in range(T):
            # d/dlogp of -(1/G) * (1/n) * sum_t logp on the best rows' valid tokens
            expected = -1 / (len(best) * n) if i in best and t < n else 0.0
            assert policy.logprobs.grad[i, t].item() == pytest.approx(expected)


def test_rank_gradient_reaches_only_candidates_of_violated_pairs():
    rollouts = make_rollouts()
    algo = make_algo(rank_weight=1.0, sft_weight=0.0, length_penalty=1.0)
    logprobs = make_logprobs(LENGTHS, seed=3)
    policy = FakePolicy(logprobs)
    loss, _ = algo.loss(policy, algo.prepare(rollouts))
    loss.backward()
    rewards, group = REWARDS.tolist(), GROUP.tolist()
    scores = ref_scores(logprobs, LENGTHS, 1.0)
    # dL/dp_k = (1/G) (#violated pairs where k is the worse one - #where k is the better one)
    dscore = [0.0] * len(group)
    for i in range(len(group)):
        for j in range(len(group)):
            if group[i] == group[j] and rewards[i] < rewards[j] and scores[i] > scores[j]:
                dscore[i] += 1 / 3
                dscore[j] -= 1 / 3
    assert any(d == 0 for d in dscore) and any(d != 0 for d in dscore)
    for i, n in enumerate(LENGTHS):
        for t in range(T):
            expected = dscore[i] / n if t < n else 0.0
            assert policy.logprobs.grad[i, t].item() == pytest.approx(expected, abs=1e-7)
