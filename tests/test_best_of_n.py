"""Best-of-n: the KL formula, the unbiased estimator against brute force, the curve on a tiny stack,
and its cache."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_config
from test_rollout import collector, setup  # noqa: F401  (setup: the module-scoped tiny stack)

from backbone import best_of_n as bon
from backbone.models import ValueModel
from backbone.stages import StageArtifacts

# N = 7 samples with tied proxy scores (three at 1.0, two at 0.3) and distinct gold
SCORES = np.array([0.3, 1.0, 0.3, 2.0, 1.0, 1.0, -0.5])
GOLD = np.array([1.0, -2.0, 0.5, 3.0, 4.0, 0.0, -1.0])


def brute_force(scores: np.ndarray, values: np.ndarray, n: int) -> float:
    """Mean over every n-subset of the value of its best by score; a tied best is one of the tied at
    random, so the subset counts the mean value of its tied maxima."""
    picks = []
    for subset in itertools.combinations(range(len(scores)), n):
        top = max(scores[i] for i in subset)
        picks.append(np.mean([values[i] for i in subset if scores[i] == top]))
    return float(np.mean(picks))


@pytest.mark.parametrize("n", range(1, 8))
def test_estimator_matches_brute_force_over_all_subsets_with_ties(n):
    assert bon.bon_estimate(SCORES, GOLD, n) == pytest.approx(brute_force(SCORES, GOLD, n), abs=1e-12)
    # the proxy score itself: E[max of n]
    assert bon.bon_estimate(SCORES, SCORES, n) == pytest.approx(brute_force(SCORES, SCORES, n), abs=1e-12)


def test_estimator_rows_and_weights():
    rng = np.random.default_rng(0)
    scores, gold = rng.normal(size=(3, 9)), rng.normal(size=(3, 9))  # [P, N]
    per_row = bon.bon_estimate(scores, gold, 4)
    assert per_row.shape == (3,)
    assert per_row == pytest.approx([brute_force(s, g, 4) for s, g in zip(scores, gold)], abs=1e-12)
    # w_i = C(i-1, n-1) / C(N, n), computed in log space: no overflow at N = 256, and they sum to 1
    for n in (1, 7, 128, 256):
        w = bon.bon_weights(256, n)
        exact = [math.comb(i - 1, n - 1) / math.comb(256, n) for i in range(1, 257)]
        np.testing.assert_allclose(w, exact, rtol=1e-9, atol=1e-300)
        assert w.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bon.bon_weights(4, 5)
    assert bon.bon_ns(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert bon.bon_ns(6) == [1, 2, 4, 6]


def test_kl_formula_matches_the_exact_kl_of_best_of_n_over_uniform_atoms():
    """Best-of-n of a uniform distribution over M distinct atoms picks rank i with
    P(i) = (i^n - (i-1)^n) / M^n; KL to uniform = sum_i P(i) log(P(i) M) -> log n - (n-1)/n."""
    m = 20000
    i = np.arange(1, m + 1)
    for n in (1, 2, 4, 16, 64, 256):
        p = (i / m) ** n - ((i - 1) / m) ** n  # [M]
        exact = float(np.sum(p[p > 0] * np.log(p[p > 0] * m)))
        assert bon.bon_kl(n) == pytest.approx(exact, abs=1e-4)
    assert bon.bon_kl(1) == 0.0


def test_the_lean_sampler_scores_what_collect_scores(setup):  # noqa: F811
    col = collector(setup)
    prompts = setup[0].eval_prompts()[:2]
    torch.manual_seed(3)
    scores, gold = bon._score_chunk(col, prompts, 3)
    torch.manual_seed(3)
    rollouts = col.collect(prompts, samples_per_prompt=3, update_stats=False)
    torch.testing.assert_close(scores, rollouts.scores)
    torch.testing.assert_close(gold, rollouts.gold)


def test_curve_on_a_tiny_stack_is_seeded_and_leaves_the_rng_alone(setup):  # noqa: F811
    col = collector(setup)
    prompts = setup[0].eval_prompts()[:3]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    rows = bon.best_of_n_curve(col, prompts, n_max=8, seed=5, chunk_size=8)
    assert torch.equal(torch.get_rng_state(), before), "the run's stream is untouched"
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    for r in rows:
        assert r["kl"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"])
        assert r["sqrt_kl"] == pytest.approx(math.sqrt(r["kl"]))
    proxy = [r["reward_mean"] for r in rows]
    assert proxy == sorted(proxy) and proxy[-1] > proxy[0]  # E[max of n] rises with n
    # n = 1 is the plain mean over every sample; the same seed draws the same samples
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        scores, gold = bon.sample_scores(col, prompts, 8, chunk_size=8)
    assert scores.shape == gold.shape == (3, 8)
    assert rows[0]["reward_mean"] == pytest.approx(scores.mean())
    assert rows[0]["gold_mean"] == pytest.approx(gold.mean())
    assert rows[-1]["gold_mean"] == pytest.approx(np.mean(bon.bon_estimate(scores, gold, 8)))
    # the same seed gives the same curve; another seed draws other samples
    assert bon.best_of_n_curve(col, prompts, n_max=8, seed=5, chunk_size=8) == rows
    assert bon.best_of_n_curve(col, prompts, n_max=8, seed=6, chunk_size=8) != rows


def test_cached_per_sft_and_reward_model(setup, tmp_path, monkeypatch):  # noqa: F811
    task, tokenizer, stack = setup
    sft, reward = tmp_path / "sft-0", tmp_path / "reward-0"
    stack.actor.save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    ValueModel.from_causal_lm(sft).save_pretrained(reward)
    stages = StageArtifacts(sft, sft, reward, reward, {}, {})
    overrides = ["frontier.best_of_n=4", "frontier.prompts=2", "rollout.max_new_tokens=8"]
    overrides += ["model.max_length=48", f"paths.artifacts={tmp_path / 'artifacts'}"]
    cfg = compose_config(overrides)
    device = torch.device("cpu")

    first = bon.write_best_of_n(cfg, task, stages, device, tmp_path / "run")
    record = json.loads(first.read_text())
    assert first == tmp_path / "run" / bon.BEST_OF_N_FILE
    assert [r["n"] for r in record["rows"]] == [1, 2, 4] and record["prompts"] == 2
    assert record["key"]["sft"] == "sft-0" and record["key"]["reward"] == "reward-0"
    folder = tmp_path / "artifacts" / record["artifact"]
    assert (folder / bon.BEST_OF_N_FILE).exists()

    def sentinel(*args, **kwargs):
        raise AssertionError("a cache hit samples nothing")

    monkeypatch.setattr(bon, "best_of_n_curve", sentinel)
    again = bon.write_best_of_n(cfg, task, stages, device, tmp_path / "run2")
    assert json.loads(again.read_text()) == record
    # another sampling seed is another artifact
    with pytest.raises(AssertionError, match="a cache hit"):
        bon.best_of_n_artifact(compose_config([*overrides, "frontier.seed=1"]), task, stages, device)
