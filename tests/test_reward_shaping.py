"""RunningMoments against numpy; RewardShaper's penalty, normalisation modes and clipping."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from backbone.reward import RewardShaper, RunningMoments

BATCHES = [
    torch.tensor([1.0, 2.0, 4.0]),
    torch.tensor([-3.0]),
    torch.tensor([0.5, 0.5, 10.0, -2.0, 7.0]),
    torch.tensor([100.0, 101.0]),
]


def test_running_moments_match_numpy():
    moments = RunningMoments()
    seen: list[float] = []
    for batch in BATCHES:
        moments.update(batch)
        seen.extend(batch.tolist())
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(np.mean(seen), rel=1e-12)
        assert moments.var == pytest.approx(np.var(seen), rel=1e-12)
        assert moments.std == pytest.approx(np.std(seen, ddof=1), rel=1e-12)


def test_running_moments_state_dict_round_trip():
    moments = RunningMoments()
    for batch in BATCHES[:2]:
        moments.update(batch)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    for m in (moments, restored):
        m.update(BATCHES[2])
    assert restored.state_dict() == moments.state_dict()


def _two_rank_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        moments = RunningMoments()
        # rank 0 sees batches 0 and 2, rank 1 batches 1 and 3: each update merges the union
        moments.update(BATCHES[rank])
        moments.update(BATCHES[2 + rank])
        results[rank] = moments.state_dict()
    finally:
        dist.destroy_process_group()


def test_running_moments_all_reduce_over_ranks():
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(free_port(), results), nprocs=2)
    everything = np.concatenate([b.numpy() for b in BATCHES])
    for rank in (0, 1):
        assert results[rank]["count"] == len(everything)
        assert results[rank]["mean"] == pytest.approx(everything.mean(), rel=1e-9)
        assert results[rank]["var"] == pytest.approx(everything.var(), rel=1e-9)


SCORES = torch.tensor([2.0, -1.0, 0.5, 8.0])
ENDED = torch.tensor([True, False, True, False])


def test_none_is_identity_and_penalty_applies_to_missing_eos_only():
    assert torch.equal(RewardShaper("none", None, None)(SCORES, ENDED), SCORES)
    got = RewardShaper("none", None, 1.5)(SCORES, ENDED)
    expected = [s - (0.0 if e else 1.5) for s, e in zip(SCORES.tolist(), ENDED.tolist())]
    assert got.tolist() == pytest.approx(expected)


def test_rm_stats_after_penalty():
    got = RewardShaper("rm_stats", None, 1.0, rm_mean=0.5, rm_std=2.0)(SCORES, ENDED)
    expected = [((s - (0.0 if e else 1.0)) - 0.5) / 2.0 for s, e in zip(SCORES.tolist(), ENDED.tolist())]
    assert got.tolist() == pytest.approx(expected)


def test_running_normalises_with_stats_including_the_batch():
    shaper = RewardShaper("running", None, None)
    seen: list[float] = []
    for batch in BATCHES[2:]:
        seen.extend(batch.tolist())
        got = shaper(batch, torch.ones_like(batch, dtype=torch.bool))
        mean, std = np.mean(seen), np.std(seen, ddof=1)
        assert got.tolist() == pytest.approx([(s - mean) / std for s in batch.tolist()], rel=1e-5)
    # the first batch alone is centred and scaled by itself
    first = RewardShaper("running", None, None)(BATCHES[0], torch.ones(3, dtype=torch.bool))
    assert first.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert first.std().item() == pytest.approx(1.0, rel=1e-5)


def test_only_the_policys_samples_join_the_running_statistics():
    """Responses taken from data (RRHF's chosen ones, preference pairs) are normalised, not counted."""
    shaper, ended = RewardShaper("running", None, None), torch.ones(4, dtype=torch.bool)
    scores, sampled = torch.tensor([1.0, 2.0, 3.0, 50.0]), torch.tensor([True, True, True, False])
    got = shaper(scores, ended, sampled=sampled)
    assert shaper.running.count == 3 and shaper.running.mean == pytest.approx(2.0)
    assert got.tolist() == pytest.approx([-1.0, 0.0, 1.0, 48.0])  # (x - 2) / 1
    shaper(scores, ended, sampled=torch.zeros(4, dtype=torch.bool))  # nothing sampled: nothing joins
    assert shaper.running.count == 3


def test_running_state_dict_round_trip():
    shaper = RewardShaper("running", None, None)
    shaper(BATCHES[0], torch.ones(3, dtype=torch.bool))
    restored = RewardShaper("running", None, None)
    restored.load_state_dict(shaper.state_dict())
    batch, ended = BATCHES[2], torch.ones(5, dtype=torch.bool)
    assert torch.equal(restored(batch, ended), shaper(batch, ended))


def test_clip_after_normalisation():
    got = RewardShaper("rm_stats", 1.0, None, rm_mean=0.0, rm_std=2.0)(SCORES, ENDED)
    expected = [min(max(s / 2.0, -1.0), 1.0) for s in SCORES.tolist()]
    assert got.tolist() == pytest.approx(expected)
    assert got.tolist() == pytest.approx([1.0, -0.5, 0.25, 1.0])


def test_invalid_configuration():
    with pytest.raises(ValueError, match=r"'zscore'.*none.*rm_stats.*running"):
        RewardShaper("zscore", None, None)
    with pytest.raises(ValueError, match="rm_std"):
        RewardShaper("rm_stats", None, None, rm_mean=0.0, rm_std=0.0)


@pytest.mark.parametrize(
    ("normalize", "units", "expected"),
    [
        ("none", "reward", 0.1),  # beta as given
        ("none", "reward_std", 0.1 * 2.5),  # 0.1 of the raw scores' spread
        ("rm_stats", "reward_std", 0.1),  # normalised rewards have unit spread
        ("running", "reward_std", 0.1),
    ],
)
def test_kl_coefficient_in_reward_standard_deviations(normalize, units, expected):
    shaper = RewardShaper(normalize=normalize, clip=None, missing_eos_penalty=None, rm_mean=1.0, rm_std=2.5)
    assert shaper.kl_coef(0.1, units) == pytest.approx(expected)
    with pytest.raises(ValueError, match="coef_units"):
        shaper.kl_coef(0.1, "nats")
