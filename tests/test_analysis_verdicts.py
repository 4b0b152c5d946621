"""Each catalogue verdict on synthetic sweeps built to be supported, contradicted or inconclusive."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pytest
from test_analysis_support import CASES, EFFECT, INITIAL_REWARD, synthetic_run

from analysis.compare import VERDICTS
from analysis.inference import t_pvalue
from analysis.records import frames_from_records
from analysis.verdicts import CLAIMS, ROWS, evaluate_all, gae_defaults, multi_adapter_memory, rrhf_online

Arm = tuple[dict, Callable[[float], dict]]


def sweep(case: str, arms: list[Arm], seeds: int = 3):
    """One run per arm (knobs, e -> run options) and seed, e being the case's effect size for that seed."""
    records = [
        synthetic_run(f"{i}-{seed}", seed, knobs, **options(e))
        for seed, e in enumerate(EFFECT[case][:seeds])
        for i, (knobs, options) in enumerate(arms)
    ]
    return frames_from_records(records)


def same(knobs: dict) -> Arm:
    return knobs, lambda e: {}


def constant(value: float) -> Callable[[int, float], float]:
    return lambda it, t: value


def zigzag_reward(amplitude: float) -> dict:
    """Training reward on the default linear curve with a +-amplitude zigzag between iterations."""
    return {"train": {"rollout/reward_mean": lambda it, t: INITIAL_REWARD + t + amplitude * (-1) ** it}}


def ema_evals(e: float) -> dict:
    # the live gold curve is -1 + 0.5 t; the EMA's ends 0.5 e above it
    return {"evals": {"eval_ema/gold_mean": lambda it, t: -1 + 0.5 * t + 0.5 * e * t}}


ALGORITHM = "algorithm.name"
# per row: arms whose per-seed effect has the sign of EFFECT[case] (see each verdict's rule)
SCENARIOS: dict[str, list[Arm]] = {
    "three_algorithms": [
        same({ALGORITHM: "ppo_gae"}),
        same({ALGORITHM: "ppo_sampled"}),
        # largest / smallest gain = 1.5 - 0.4 e: inside the margin 1.5 for e > 0, beyond it for e < 0
        ({ALGORITHM: "rrhf"}, lambda e: {"gain": 1.5 - 0.4 * e}),
    ],
    "rrhf_fast_but_far": [
        same({ALGORITHM: "ppo_gae"}),
        same({ALGORITHM: "ppo_sampled"}),
        ({ALGORITHM: "rrhf"}, lambda e: {"speed": 4 * e, "kl": 1 + e}),
    ],
    "tuning_sensitivity": [
        *(
            ({ALGORITHM: "ppo_gae", "algorithm.lr": lr}, lambda e, i=i: {"gain": 1 + i})
            for i, lr in enumerate([1e-4, 3e-4, 1e-3])
        ),
        *(
            ({ALGORITHM: "rrhf", "algorithm.lr": lr}, lambda e, i=i: {"gain": 1 + i * (1 - 0.5 * e)})
            for i, lr in enumerate([3e-5, 1e-4, 3e-4])
        ),
    ],
    "gae_defaults": [
        same({"algorithm.gamma": 1.0, "algorithm.lam": 0.95}),
        ({"algorithm.gamma": 0.99, "algorithm.lam": 0.95}, lambda e: {"gain": 1 - e}),
        same({"algorithm.gamma": 1.0, "algorithm.lam": 0.9}),
    ],
    "advantage_whitening": [
        (
            {"algorithm.whiten_advantages": False},
            lambda e: {"train": {"train/policy_loss": lambda it, t: (-1) ** it}},
        ),
        (
            {"algorithm.whiten_advantages": True},
            lambda e: {"train": {"train/policy_loss": lambda it, t: (1 - 0.5 * e) * (-1) ** it}},
        ),
    ],
    "adam_eps": [
        same({"optim.eps": 1e-8}),
        # supported: a clear difference; contradicted: one clearly within 10% of the gain
        ({"optim.eps": 1e-5}, lambda e: {"gain": 1 + (e if e > 0 else 0.01 * e)}),
    ],
    "ppo_epochs": [
        same({"algorithm.ppo_epochs": 1}),
        ({"algorithm.ppo_epochs": 2}, lambda e: {"gain": 1 + e}),
        ({"algorithm.ppo_epochs": 4}, lambda e: {"gain": 1 + 0.5 * e}),
    ],
    "rollout_size": [
        ({}, lambda e: {"samples_per_iteration": 32, "iterations": 40, "wiggle": 0.1 * max(e, 0)}),
        ({}, lambda e: {"samples_per_iteration": 64, "iterations": 20}),
        ({}, lambda e: {"samples_per_iteration": 128, "iterations": 10, "speed": -2 * e}),
    ],
    "sampled_baseline": [
        ({ALGORITHM: "ppo_sampled", "algorithm.baseline": "critic"}, lambda e: {"gain": 2}),
        ({ALGORITHM: "ppo_sampled", "algorithm.baseline": "sampled_mean"}, lambda e: {"gain": 2 + e}),
        ({ALGORITHM: "ppo_sampled", "algorithm.baseline": "leave_one_out"}, lambda e: {"gain": 2}),
    ],
    "rm_pooling": [
        ({"reward.pooling": "last"}, lambda e: {"gold": 2 + e, "speed": 4 * e}),
        ({"reward.pooling": "mean"}, lambda e: {"gold": 2}),
    ],
    "rrhf_online": [
        same({ALGORITHM: "rrhf", "algorithm.mode": "offline"}),
        ({ALGORITHM: "rrhf", "algorithm.mode": "online"}, lambda e: {"gain": 1 + e}),
    ],
    "ema": [({"ema.enabled": True}, ema_evals), same({"ema.enabled": False})],
    "ptx": [
        ({"ptx.coef": 0.0}, lambda e: {"evals": {"eval/sft_loss": lambda it, t: 1.8 + t}}),
        ({"ptx.coef": 1.0}, lambda e: {"evals": {"eval/sft_loss": lambda it, t: 1.8 + (1 - 0.5 * e) * t}}),
    ],
    "kl_penalty": [({"kl.coef": 0.0}, lambda e: {"gain": 2, "gold": -e}), same({"kl.coef": 0.05})],
    "negative_kl": [
        (
            {"kl.estimator": "k1", "rollout.min_new_tokens": 0},
            lambda e: {"train": {"rollout/kl_negative_frac": constant(0.3)}},
        ),
        (
            {"kl.estimator": "k1", "rollout.min_new_tokens": 16},
            lambda e: {"train": {"rollout/kl_negative_frac": constant(0.3 + 0.2 * e)}},
        ),
        *(
            (
                {"kl.estimator": "k3", "rollout.min_new_tokens": n},
                lambda e: {"train": {"rollout/kl_negative_frac": constant(0.0)}},
            )
            for n in (0, 16)
        ),
    ],
    "reward_normalization": [
        ({"reward.normalize": "none"}, lambda e: zigzag_reward(0.2)),
        ({"reward.normalize": "rm_stats"}, lambda e: zigzag_reward(0.2 - 0.1 * e)),
        same({"reward.normalize": "running"}),
    ],
}


def test_every_catalogue_row_has_a_function_and_a_scenario():
    assert list(ROWS) == list(CLAIMS)
    assert set(SCENARIOS) | {"multi_adapter_memory"} == set(ROWS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("row", sorted(SCENARIOS))
def test_verdict_cases(row, case):
    runs, history = sweep(case, SCENARIOS[row])
    verdict = ROWS[row](runs, history)
    assert verdict.verdict == case, (verdict.numbers, verdict.note)
    assert verdict.id == row and verdict.claim == CLAIMS[row]
    assert verdict.seeds == 3 and verdict.numbers and verdict.source == "synthetic"
    # every inconclusive verdict says how many seeds would tell its noisy effects apart
    assert ("seeds needed for 80% power at alpha 0.05: " in verdict.note) == (case == "inconclusive")
    assert all(isinstance(p, float) for k, p in verdict.numbers.items() if ": p (" in k)


@pytest.mark.parametrize("row", sorted(set(SCENARIOS) - {"three_algorithms", "rrhf_fast_but_far"}))
def test_not_run_without_the_sweep(row):
    runs, history = sweep("supported", SCENARIOS["three_algorithms"])
    verdict = ROWS[row](runs, history)
    assert verdict.verdict == "not run" and verdict.note.startswith("needs ") and verdict.seeds == 0


def test_one_seed_is_inconclusive_with_its_lean():
    runs, history = sweep("supported", SCENARIOS["rrhf_online"], seeds=1)
    verdict = rrhf_online(runs, history)
    assert verdict.verdict == "inconclusive" and verdict.seeds == 1
    assert "one seed has no interval; the point estimates lean supported" in verdict.note
    assert "final reward [online] - [offline]: no effect observed (one seed: sd undefined)" in verdict.note


def test_failed_runs_are_left_out():
    runs, history = sweep("supported", SCENARIOS["rrhf_online"])
    failed = synthetic_run("bad", 0, {ALGORITHM: "rrhf", "algorithm.mode": "online"}, gain=-5, failure="boom")
    runs_f, history_f = frames_from_records([failed])
    verdict = rrhf_online(pd.concat([runs, runs_f]), pd.concat([history, history_f]))
    assert verdict.verdict == "supported"


def test_contexts_must_agree():
    """Whitening helps ppo_gae and hurts ppo_sampled: each context is clear, together inconclusive."""
    arms = SCENARIOS["advantage_whitening"]
    gae_runs, gae_history = sweep("supported", [({**k, ALGORITHM: "ppo_gae"}, o) for k, o in arms])
    sampled = sweep("contradicted", [({**k, ALGORITHM: "ppo_sampled"}, o) for k, o in arms])
    runs = pd.concat([gae_runs, sampled[0].assign(run=lambda f: "s" + f["run"])])
    history = pd.concat([gae_history, sampled[1].assign(run=lambda f: "s" + f["run"])])
    verdict = ROWS["advantage_whitening"](runs, history)
    assert verdict.verdict == "inconclusive"
    assert "algorithm.name=ppo_gae: supported" in verdict.note and "ppo_sampled: contradicted" in verdict.note
    assert any(k.startswith("algorithm.name=ppo_sampled: ") for k in verdict.numbers)


def test_holm_across_the_effects_of_a_row():
    """gae_defaults tests the default against the best and against each other setting (three effects):
    a setting worse by 1.4, 2.0, 2.6 has t-test p = 0.029 alone, 3 x 0.029 after Holm: not clear."""
    worse = [1.4, 2.0, 2.6]
    settings = [(1.0, 0.95), (0.99, 0.95), (1.0, 0.9)]
    records = [
        synthetic_run(
            f"{i}-{seed}",
            seed,
            {"algorithm.gamma": gamma, "algorithm.lam": lam},
            gain=1 - (x if (gamma, lam) == (0.99, 0.95) else 0),
        )
        for seed, x in enumerate(worse)
        for i, (gamma, lam) in enumerate(settings)
    ]
    verdict = gae_defaults(*frames_from_records(records))
    p = t_pvalue(worse)
    assert p < 0.05 < 3 * p
    assert verdict.numbers["default - (0.99, 0.95): p (t test, Holm-adjusted)"] == pytest.approx(3 * p)
    assert verdict.verdict == "inconclusive"


def test_runs_compared_at_equal_samples():
    """The offline run went on twice as long; it is read at the online run's sample count."""
    records = [
        synthetic_run("on", s, {ALGORITHM: "rrhf", "algorithm.mode": "online"}, gain=2) for s in range(3)
    ] + [
        synthetic_run(
            "off", s, {ALGORITHM: "rrhf", "algorithm.mode": "offline"}, gain=2.0 + s / 10, iterations=40
        )
        for s in range(3)
    ]
    for i, r in enumerate(records):
        r.run = f"{r.run}{i}"
    verdict = rrhf_online(*frames_from_records(records))
    assert "runs cut at 1280 samples" in verdict.note
    # linear curves: half way through its 40 iterations the offline run has half its gain
    assert verdict.numbers["final reward [offline]"].mean == pytest.approx(-2 + (2.0 + 0.1) / 2)
    assert verdict.verdict == "supported"


def memory(mode: str, ratio: float) -> dict:
    return {
        "mode": mode,
        "peak_bytes": int(ratio * 1000),
        "one_model_bytes": 1000,
        "path": f"/b/memory_{mode}.json",
    }


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [([1.1], "supported"), ([3.5, 3.2], "contradicted"), ([1.1, 1.4], "inconclusive"), ([], "not run")],
)
def test_multi_adapter_memory(ratios, expected):
    runs, history = frames_from_records([])
    results = [memory("lora_multi_adapter", r) for r in ratios] + [memory("none", 4.2)]
    verdict = multi_adapter_memory(runs, history, results)
    assert verdict.verdict == expected
    if ratios:
        assert verdict.numbers["peak / one model [none]"].mean == pytest.approx(4.2)
        assert (
            verdict.seeds == len(ratios)
            and verdict.source == "/b/memory_lora_multi_adapter.json, /b/memory_none.json"
        )


def test_evaluate_all_lists_every_row_in_order():
    runs, history = sweep("supported", SCENARIOS["three_algorithms"])
    verdicts = evaluate_all(runs, history)
    assert [v.id for v in verdicts] == list(CLAIMS)
    assert all(v.verdict in VERDICTS for v in verdicts)
    assert verdicts[0].verdict == "supported"
