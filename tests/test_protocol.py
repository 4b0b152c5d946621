"""The comparison protocol's run-side parts: pipeline seeds, evaluation spaced in samples with common
random numbers, budget accounting, the tuning score, and the tuned sweeper end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, read_history, read_summary, run_entry
from omegaconf import OmegaConf
from test_run import SMALL as RUN_SMALL

from backbone.rng import apply_seed_scope
from backbone.trainer import evaluation_due, mean_gain_over_budget, sampling_se
from hydra_plugins.sandbox_sweepers.tuned_sweeper import beyond, check_grids, edges, grid_cells, pick

# the entry point's small config (8 samples per iteration), without W&B
SMALL = [*RUN_SMALL, "logger.mode=disabled"]
STAGE_SEEDS = ("task.seed", "sft.seed", "reward_model.seed")


# --------------------------------------------------------------------------- pipeline seeds


def stage_seeds(overrides: list[str]) -> list[int]:
    cfg = apply_seed_scope(compose_config(overrides))
    return [OmegaConf.select(cfg, key) for key in STAGE_SEEDS]


def test_pipeline_seed_drives_every_stage_and_rl_seed_none():
    assert stage_seeds(["seed=7"]) == [7, 7, 7]  # pipeline is the default
    assert stage_seeds(["seed=7", "seed_scope=rl"]) == [0, 0, 0]
    assert stage_seeds(["seed=7", "pinned_stages=[task]"]) == [0, 7, 7]
    with pytest.raises(ValueError, match="pinned_stages"):
        stage_seeds(["seed=7", "seed_scope=rl", "pinned_stages=[sft]"])


# --------------------------------------------------------------------------- evaluation in samples


def eval_samples(samples_per_iteration: int, total: int, every: int) -> list[int]:
    last = total // samples_per_iteration
    due = [i for i in range(last + 1) if i == 0 or evaluation_due(i, last, samples_per_iteration, 5, every)]
    return [i * samples_per_iteration for i in due]


def test_evaluations_fall_at_the_same_sample_counts_for_16_and_256_per_iteration():
    small, large = eval_samples(16, 2048, 512), eval_samples(256, 2048, 512)
    assert small == large == [0, 512, 1024, 1536, 2048]
    # spaced in iterations, the same budget gives 16-sample arms many more points
    last = 2048 // 16
    assert sum(evaluation_due(i, last, 16, 5, None) for i in range(1, last + 1)) == 26


def test_mean_gain_over_budget_against_a_loop():
    points = [(0, 1.0), (64, 2.0), (128, 1.5), (256, 3.0)]
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):  # trapezoids of the gain over the start
        area += (x1 - x0) * ((y0 - 1.0) + (y1 - 1.0)) / 2
    assert mean_gain_over_budget(points) == pytest.approx(area / 256)
    assert math.isnan(mean_gain_over_budget([(0, 1.0)]))


def test_sampling_se_against_a_loop():
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 4.0, 0.0, 5.0])
    group = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    total = 0.0
    for g in range(3):
        members = [v for v, gg in zip(values.tolist(), group.tolist()) if gg == g]
        mean = sum(members) / len(members)
        variance = sum((v - mean) ** 2 for v in members) / (len(members) - 1)
        total += variance / len(members)
    assert sampling_se(values, group) == pytest.approx(math.sqrt(total) / 3)
    assert math.isnan(sampling_se(values[:3], torch.tensor([0, 0, 1])))


# --------------------------------------------------------------------------- the tuned sweeper's rules


def test_grids_must_have_equal_size():
    grids = {"a": {"lr": [1, 2, 3], "x": [1, 2]}, "b": {"lr": [1, 2], "y": [1, 2, 3]}}
    check_grids(["a", "b"], grids)
    assert grid_cells(grids["a"])[1] == ["algorithm.lr=1", "algorithm.x=2"]
    with pytest.raises(ValueError, match="unequal tuning effort"):
        check_grids(["a", "b"], {**grids, "b": {"lr": [1, 2]}})
    with pytest.raises(ValueError, match="no grid"):
        check_grids(["a", "c"], grids)


def test_pick_takes_the_best_mean_and_never_a_cell_that_failed():
    cells = [["x=1"], ["x=2"], ["x=3"]]
    best, means = pick(cells, [[1.0, 2.0], [3.0, -math.inf], [2.0, 2.5]])
    assert best == 2 and means[0] == pytest.approx(1.5) and means[1] == -math.inf


def test_edges_name_the_numeric_knobs_picked_at_an_end_of_their_grid():
    grid = {"lr": [1e-4, 3e-4, 1e-3], "samples_per_prompt": [4, 8], "baseline": ["a", "b"]}
    cell = ["algorithm.lr=0.001", "algorithm.samples_per_prompt=4", "algorithm.baseline=a"]
    assert edges(grid, cell) == {"lr": "highest", "samples_per_prompt": "lowest"}  # not the word axis
    assert edges(grid, ["algorithm.lr=0.0003", "algorithm.samples_per_prompt=8", "algorithm.baseline=b"]) == {
        "samples_per_prompt": "highest"
    }


def test_beyond_steps_past_an_edge_by_the_ratio_of_the_outermost_values():
    assert beyond([1e-4, 3e-4, 1e-3], "highest") == pytest.approx(1e-3 * 1e-3 / 3e-4, rel=1e-2)
    assert beyond([1e-4, 3e-4, 1e-3], "lowest") == pytest.approx(1e-4 / 3, rel=1e-2)
    assert beyond([4, 8], "lowest") == 2 and beyond([4, 8], "highest") == 16
    assert beyond([1, 2], "lowest") == 0  # integers stay integers (a cell that cannot run scores -inf)
    assert beyond([0.0, 0.5], "lowest") == -0.5  # not both positive: by the difference


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tuned_sweep(tmp_path_factory, artifacts_dir) -> Path:
    """Two arms x two learning rates on one tuning seed, then the picks on an evaluation seed."""
    sweep = tmp_path_factory.mktemp("tuned") / "sweep"
    result = run_entry(
        [
            "-m",
            "hydra/sweeper=tuned",
            "hydra.sweeper.arms=[ppo_gae,rrhf]",
            "hydra.sweeper.grids.ppo_gae={lr:[1e-4,1e-3],cliprange:[0.2]}",
            "hydra.sweeper.grids.rrhf={lr:[3e-5,3e-4],rank_weight:[0.1]}",
            "hydra.sweeper.tuning_seeds=[100]",
            "hydra.sweeper.eval_seeds=[0]",
            "hydra.sweeper.extend_edges=1",  # two learning rates: the pick is at an edge, one more is tried
            *SMALL,
            "seed_scope=rl",  # one SFT / reward model for every job, from the session's cache
            "iterations=2",
            "rollout.eval_every_samples=8",
            f"paths.artifacts={artifacts_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=sweep.parent,
    )
    # the end-of-sweep report, once, after the evaluation phase
    assert result.stdout.count(f"sweep report: {sweep / 'report' / 'report.md'}") == 1
    return sweep


def test_tuned_sweeper_picks_on_tuning_seeds_and_evaluates_on_others(tuned_sweep):
    tuning = json.loads((tuned_sweep / "tuning.json").read_text())
    for arm, record in tuning["arms"].items():
        # two learning rates, whichever was picked is an edge: one step beyond it (x or / 10) was tuned too,
        # each cell by one job (the first round's jobs are not run again); the edges are those of the pick
        first, second, third = record["grid"]["lr"]
        assert third == pytest.approx(second * 10) or third == pytest.approx(first / 10)
        assert len(record["cells"]) == 3 and len({c["jobs"][0] for c in record["cells"]}) == 3
        assert record["edges"] == edges(record["grid"], record["picked"])
        # each cell's score is what its tuning job recorded; the pick is the best of them
        for cell in record["cells"]:
            (job,) = cell["jobs"]
            summary = read_summary(tuned_sweep / job)
            assert summary["seed"] == 100
            assert cell["scores"] == [pytest.approx(summary["auc_gain/eval/gold_mean"])]
            config = OmegaConf.load(tuned_sweep / job / ".hydra" / "config.yaml")
            assert config.phase == "tune" and config.algorithm.name == arm
        best = max(record["cells"], key=lambda c: c["mean"])
        assert record["picked"] == best["overrides"]
        # the picked config is a reusable algorithm option
        option = tuned_sweep / "conf" / "algorithm" / f"tuned_{arm}.yaml"
        cfg = compose_config([f"hydra.searchpath=[file://{option.parents[1]}]", f"algorithm=tuned_{arm}"])
        assert f"algorithm.lr={cfg.algorithm.lr}" in best["overrides"]
    evaluated = sorted(p for p in tuned_sweep.iterdir() if (p / "summary.json").exists())
    assert len(evaluated) == 2  # two arms x one evaluation seed
    first_evals = {}
    for job in evaluated:
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        summary = read_summary(job)
        assert config.phase == "evaluate" and config.seed == 0
        picked = tuning["arms"][config.algorithm.name]["picked"]
        assert f"algorithm.lr={config.algorithm.lr}" in picked
        # the compute each arm spent: 2 iterations x epochs x one minibatch of the 8 samples
        rows = [r for r in read_history(job) if "iteration" in r]
        assert summary["optimizer_steps"] == 2 * config.algorithm.ppo_epochs
        assert summary["tokens_trained"] > config.algorithm.ppo_epochs * summary["tokens"]
        assert [r["samples"] for r in rows if "eval/gold_mean" in r] == [0, 8, 16]
        first_evals.setdefault(config.seed, []).append(rows[0]["eval/reward_mean"])
    # common random numbers: the same SFT policy reads the same at iteration 0 in every arm of a seed
    for readings in first_evals.values():
        assert len(readings) == 2 and readings[0] == readings[1]


def test_report_shows_each_arm_with_its_pick_and_budget_and_leaves_tuning_runs_out(tuned_sweep, tmp_path):
    from analysis.records import load_local
    from analysis.report import build_report

    text = build_report(load_local([tuned_sweep]), tmp_path / "report").text
    tuning = json.loads((tuned_sweep / "tuning.json").read_text())
    arms = text[text.index("## Arms") : text.index("## Tuning")]
    for arm, record in tuning["arms"].items():
        (row,) = [line for line in arms.splitlines() if line.startswith(f"| {arm} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == " ".join(record["picked"]) and cells[3] == "1"  # the pick, one evaluation seed
        assert cells[2] == (", ".join(f"{k} ({side})" for k, side in record["edges"].items()) or "none")
        summary = next(
            read_summary(job)
            for job in tuned_sweep.iterdir()
            if (job / "summary.json").exists() and read_summary(job)["algorithm"] == arm
        )
        assert cells[7] == f"{summary['budget']} {summary['budget_unit']}"  # the budget reached, in its unit
        assert float(cells[8]) == summary["optimizer_steps"] and float(cells[9]) == summary["tokens_trained"]
    grid = text[text.index("## Tuning") : text.index("## Gold at KL")]
    assert sum(line.startswith(("| ppo_gae |", "| rrhf |")) for line in grid.splitlines()) == 6
    # the series table holds the evaluation runs only: one run per arm, no tuning or stage job
    series = text[text.index("## Runs by series") :].split("## Verdicts")[0]
    rows = [line.split("|") for line in series.splitlines() if line.startswith(("| ppo_gae", "| rrhf"))]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [("ppo_gae", "1"), ("rrhf", "1")]
    # the frontier: each arm's gold at KL budgets beside best-of-n from the same SFT policy and reward model
    frontier = text[text.index("## Gold at KL") : text.index("## Runs by series")]
    rows = [line.split("|")[1].strip() for line in frontier.splitlines() if line.startswith("| ")]
    assert rows == ["series", "---", "ppo_gae", "rrhf", "best-of-n (SFT policy)"]
    assert (tmp_path / "report" / "frontier.png").exists()
