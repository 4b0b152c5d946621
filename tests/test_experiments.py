"""The ablation catalogue as sweeps: every experiment's grid composes, and one runs into a report."""

import functools
import itertools
import json
import os
import subprocess
import sys

import pytest
from conftest import CONF, read_summary, run_entry
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from test_run import SMALL

from hydra_plugins.sandbox_sweepers.tuned_sweeper import check_grids, grid_cells

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@functools.cache  # composed once per experiment (half a second each), read by several helpers
def sweeper(experiment: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    return cfg.hydra.sweeper


def is_tuned(experiment: str) -> bool:
    return sweeper(experiment)._target_.endswith("TunedSweeper")


def sweep_params(experiment: str) -> dict[str, list[str]]:
    """Each swept key's values as Hydra expands them (`a,b`, `range(0,10)`)."""
    parser = OverridesParser.create()
    params = {}
    for key, value in sweeper(experiment).params.items():
        override = parser.parse_override(f"{key}={value}")
        swept = override.is_sweep_override()
        params[key] = list(override.sweep_string_iterator()) if swept else [str(value)]
    return params


def jobs(experiment: str) -> list[list[str]]:
    """The jobs whose configs differ in kind: a basic sweep's grid on its first seed and its first cell
    on every seed (seeds change no key's type); a tuned sweep's tuning and evaluation jobs."""
    params = sweep_params(experiment)
    if not is_tuned(experiment):
        seeds = params.pop("seed")
        cells = [
            [f"{k}={v}" for k, v in zip(params, values)] for values in itertools.product(*params.values())
        ]
        return [*([*cell, f"seed={seeds[0]}"] for cell in cells), *([*cells[0], f"seed={s}"] for s in seeds)]
    tuned = sweeper(experiment)
    fixed = [f"{k}={v[0]}" for k, v in params.items()]
    # every cell on a tuning seed, every evaluation seed on one cell (seeds change no key's type)
    return [
        *(
            [f"algorithm={arm}", *cell, f"seed={tuned.tuning_seeds[0]}", *fixed]
            for arm in tuned.arms
            for cell in grid_cells(tuned.grids[arm])
        ),
        *([f"algorithm={tuned.arms[0]}", f"seed={seed}", *fixed] for seed in tuned.eval_seeds),
    ]


def test_every_experiment_sweeps_seeds_and_lands_in_its_own_folder():
    assert len(EXPERIMENTS) >= 14
    for experiment in EXPERIMENTS:
        if is_tuned(experiment):
            # the protocol's algorithm comparisons: equal grids, 10 evaluation seeds apart from tuning's
            tuned = sweeper(experiment)
            check_grids(tuned.arms, tuned.grids)
            assert len(tuned.eval_seeds) >= 10 and not set(tuned.eval_seeds) & set(tuned.tuning_seeds)
            continue
        # the protocol: 10 seeds that vary the whole pipeline, evaluations spaced in samples
        params = sweep_params(experiment)
        assert params["seed"] == [str(s) for s in range(10)], experiment
        assert params["seed_scope"] == ["pipeline"] and "rollout.eval_every_samples" in params, experiment
        assert len(params) >= 3, experiment


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_the_grid_composes(experiment):
    seeds = set(range(10))
    if is_tuned(experiment):
        seeds = {*sweeper(experiment).tuning_seeds, *sweeper(experiment).eval_seeds}
    every_job = jobs(experiment)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for overrides in every_job:
            cfg = compose("config", overrides=[f"+experiment={experiment}", *overrides])
            assert cfg.seed in seeds


def test_a_real_experiment_sweep_reads_back_into_a_report(tmp_path, artifacts_dir):
    sweep = tmp_path / "sweep"
    run_entry(
        [
            "-m",
            "+experiment=rrhf_online",
            "seed=0,1",
            *SMALL,
            "total_samples=16",  # 2 iterations of SMALL's 8 samples, evaluated at each
            "rollout.eval_every_samples=8",
            "logger.mode=disabled",
            # each seed's stages from the session's cache (test_run.py's multirun test builds its own)
            f"paths.artifacts={artifacts_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    modes = sorted(read_summary(sweep / str(i))["algorithm"] for i in range(4))
    assert modes == ["rrhf"] * 4
    report = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(sweep), "--out", str(tmp_path / "report")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| rrhf_online |" in text and "| three_algorithms |" in text
    row = next(line for line in text.splitlines() if line.startswith("| rrhf_online |"))
    assert "not run" not in row  # the sweep's runs were found and judged
    assert list((tmp_path / "report").glob("*.png"))
    assert "rrhf_online" in report.stdout


def test_a_sample_budget_sets_the_iterations_for_every_rollout_size():
    from types import SimpleNamespace

    from backbone.trainer import planned_iterations

    def cfg(per_iteration, total):
        return SimpleNamespace(
            iterations=60, total_samples=total, rollout=SimpleNamespace(samples_per_iteration=per_iteration)
        )

    assert [planned_iterations(cfg(n, 3840)) for n in (16, 64, 256)] == [240, 60, 15]
    assert planned_iterations(cfg(64, None)) == 60


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("local_parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")],
)
def test_launcher_configs_compose(launcher, target):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_a_failing_job_is_recorded_and_the_others_complete(tmp_path, artifacts_dir):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "-m",
            "hydra/launcher=local_parallel",
            *SMALL,
            "algorithm=ppo_sampled",
            "rollout.min_new_tokens=0,99",  # job 1 fails at start-up (a bad choice fails the whole sweep)
            "iterations=1",
            "logger.mode=disabled",
            f"paths.artifacts={artifacts_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0  # the sweep reports that a job failed ...
    good = read_summary(sweep / "0")
    assert good["iterations"] == 1  # ... after the good job ran to the end
    assert good["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)  # its share: 2 jobs at once
    failure = json.loads((sweep / "1" / "failure.json").read_text())
    assert "rollout.min_new_tokens=99 >" in failure["error"] and "Traceback" in failure["traceback"]
    assert "rollout.min_new_tokens=99" in failure["overrides"]


def test_a_preset_without_multirun_is_refused_saying_to_add_m(tmp_path):
    run_dir = tmp_path / "run"
    args = ["+experiment=kl_penalty", f"paths.artifacts={tmp_path / 'artifacts'}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "+experiment=kl_penalty is a sweep: add -m" in result.stderr
    assert not (tmp_path / "artifacts").exists() and not (run_dir / "history.jsonl").exists()
