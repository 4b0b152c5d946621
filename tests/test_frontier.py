"""The gold-vs-KL frontier: paths, interpolation at KL budgets, the table and the figure, on
hand-made frames; and best_of_n.json read into `Records.best_of_n`."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.frontier import (
    BEST_OF_N,
    first_crossing,
    frontier_figure,
    gold_at_kl,
    gold_at_kl_table,
    run_path,
)
from analysis.records import RunRecord, best_of_n_frame, load_local
from analysis.stats import mean_ci


def bon_rows(gold: list[float]) -> list[dict]:
    """A best-of-n curve for n = 1, 2, 4, ... with the given gold values."""
    rows = []
    for k, g in enumerate(gold):
        n = 2**k
        kl = math.log(n) - (n - 1) / n
        rows.append({"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl), "gold_mean": g, "reward_mean": g})
    return rows


def test_first_crossing_reads_the_path_where_it_first_reaches_each_x():
    x = np.array([0.0, 1.0, 2.0, 1.5, 3.0])  # KL falls back, then rises past 2
    y = np.array([0.0, 1.0, 3.0, 2.0, 4.0])
    got = first_crossing(x, y, [0.0, 0.5, 1.5, 2.5, 3.0, 4.0])
    # 2.5 is first reached on the segment (1.5, 2) -> (3, 4): 2 + (1 / 1.5) * 2
    np.testing.assert_allclose(got[:5], [0.0, 0.5, 2.0, 2 + 2 / 1.5, 4.0])
    assert np.isnan(got[5])  # never reached: not extrapolated
    assert np.isnan(first_crossing(np.array([0.5, 1.0]), np.array([1.0, 2.0]), [0.2])[0])  # before the start


def test_run_path_clips_negative_kl_and_follows_training_order():
    history = pd.DataFrame(
        {
            "iteration": [2, 0, 1, 3],
            "samples": [16, 0, 8, 24],
            "eval/kl_mean": [4.0, -0.01, np.nan, 9.0],
            "eval/gold_mean": [1.0, 0.0, np.nan, 2.0],
        }
    )
    x, y = run_path(history)
    np.testing.assert_allclose(x, [0.0, 2.0, 3.0])
    np.testing.assert_allclose(y, [0.0, 1.0, 2.0])


@pytest.fixture
def frames():
    """Two ppo runs (seeds 0, 1), one rrhf run (seed 0); each seed has its own best-of-n artifact,
    shared by the runs of that seed."""
    runs = pd.DataFrame(
        {
            "run": ["ppo0", "ppo1", "rrhf0"],
            "algorithm.name": ["ppo_gae", "ppo_gae", "rrhf"],
            "algorithm": ["ppo_gae", "ppo_gae", "rrhf"],
            "seed": [0, 1, 0],
        }
    )
    paths = {  # eval KL (nats) and gold at samples 0, 8, 16
        "ppo0": ([0.0, 1.0, 4.0], [0.0, 1.0, 2.0]),
        "ppo1": ([0.0, 4.0, 9.0], [0.0, 3.0, 5.0]),
        "rrhf0": ([0.0, 0.25, 1.0], [0.0, 0.5, 0.5]),
    }
    history = pd.DataFrame(
        [
            {"run": run, "iteration": i, "samples": 8 * i, "eval/kl_mean": kl, "eval/gold_mean": gold}
            for run, (kls, golds) in paths.items()
            for i, (kl, gold) in enumerate(zip(kls, golds))
        ]
    )
    records = [
        RunRecord(run, run, "sweep", best_of_n={"artifact": f"bon-{seed}", "rows": bon_rows(gold)})
        for run, seed, gold in [
            ("ppo0", 0, [0.0, 1.0, 2.0, 3.0, 4.0]),
            ("ppo1", 1, [0.0, 2.0, 3.0, 4.0, 5.0]),
            ("rrhf0", 0, [0.0, 1.0, 2.0, 3.0, 4.0]),
        ]
    ]
    return runs, history, best_of_n_frame(records)


def test_gold_at_kl_budgets_per_run_and_per_best_of_n_curve(frames):
    runs, history, bon = frames
    frame = gold_at_kl(runs, history, bon, budgets=(1.0, 4.0, 9.0))
    rl = frame[frame["series"] != BEST_OF_N].set_index(["run", "kl"])["gold"]
    assert rl[("ppo0", 1.0)] == pytest.approx(1.0) and rl[("ppo0", 4.0)] == pytest.approx(2.0)
    assert np.isnan(rl[("ppo0", 9.0)])  # never reached
    # ppo1: sqrt(KL) 0 -> 2 with gold 0 -> 3; sqrt(1) = 1 is half way: 1.5
    assert rl[("ppo1", 1.0)] == pytest.approx(1.5) and rl[("ppo1", 9.0)] == pytest.approx(5.0)
    assert rl[("rrhf0", 1.0)] == pytest.approx(0.5)
    assert frame.set_index("run").loc["ppo1", "artifact"].iloc[0] == "bon-1"  # paired with its own curve
    best = frame[frame["series"] == BEST_OF_N]
    assert sorted(best["artifact"].unique()) == ["bon-0", "bon-1"]  # the shared curve counted once
    assert len(best) == 2 * 3
    # best-of-n at KL = 1: between n = 4 (KL 0.636) and n = 8 (KL 1.204), linear in sqrt(KL)
    x4, x8 = math.sqrt(math.log(4) - 0.75), math.sqrt(math.log(8) - 7 / 8)
    expected = 2.0 + (1.0 - x4) / (x8 - x4)
    seed0 = best.set_index(["artifact", "kl"])["gold"]
    assert seed0[("bon-0", 1.0)] == pytest.approx(expected)
    assert np.isnan(seed0[("bon-0", 9.0)])  # best-of-16 reaches KL 1.83 only


def test_gold_at_kl_table_rows(frames):
    runs, history, bon = frames
    headers, rows = gold_at_kl_table(runs, history, bon, budgets=(1.0, 4.0, 9.0))
    assert headers == ["series", "runs", "gold at KL = 1", "gold at KL = 4", "gold at KL = 9"]
    table = {row[0]: row[1:] for row in rows}
    assert set(table) == {"ppo_gae", "rrhf", BEST_OF_N}
    assert table["ppo_gae"][:3] == ["2", str(mean_ci([1.0, 1.5])), str(mean_ci([2.0, 3.0]))]
    assert table["ppo_gae"][3] == f"{mean_ci([5.0])}; 1 of 2 not reached"  # censored, not averaged in
    assert table["rrhf"][1:] == [str(mean_ci([0.5])), "not reached", "not reached"]
    assert table[BEST_OF_N][0] == "2" and table[BEST_OF_N][3] == "not reached"


def test_frontier_figure_writes_one_png(frames, tmp_path):
    runs, history, bon = frames
    path = frontier_figure(runs, history, bon, tmp_path)
    assert path == tmp_path / "frontier.png" and path.stat().st_size > 0
    named = frontier_figure(runs, history, bon.iloc[0:0], tmp_path / "row" / "three_algorithms_frontier.png")
    assert named.exists()  # no best-of-n curve: the runs alone


def test_records_read_best_of_n_json(tmp_path):
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps({"algorithm": "ppo_gae", "seed": 0}))
    curve = {"artifact": "best_of_n-abc", "rows": bon_rows([0.0, 1.0])}
    (job / "best_of_n.json").write_text(json.dumps(curve))
    (tmp_path / "sweep" / "1").mkdir()
    (tmp_path / "sweep" / "1" / "summary.json").write_text(json.dumps({"algorithm": "rrhf", "seed": 0}))
    records = load_local([tmp_path / "sweep"])
    bon = records.best_of_n
    assert list(bon.columns) == ["run", "artifact", "n", "kl", "sqrt_kl", "gold_mean", "reward_mean"]
    assert bon["run"].tolist() == [str(job.resolve())] * 2 and bon["n"].tolist() == [1.0, 2.0]
    assert bon["artifact"].unique().tolist() == ["best_of_n-abc"]
    assert best_of_n_frame([]).empty
