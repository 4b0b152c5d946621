"""The ablation catalogue as sweeps: every experiment's grid composes, and one runs into a report."""

import itertools
import json
import subprocess
import sys

import pytest
from conftest import CONF, read_summary, run_entry
from hydra import compose, initialize_config_dir
from test_run import SMALL

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def sweep_params(experiment: str) -> dict[str, list[str]]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    return {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}


def test_every_experiment_sweeps_seeds_and_lands_in_its_own_folder():
    assert len(EXPERIMENTS) >= 14
    for experiment in EXPERIMENTS:
        params = sweep_params(experiment)
        assert params["seed"] == ["0", "1", "2"], experiment
        assert len(params) >= 2, experiment


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_the_grid_composes(experiment):
    params = sweep_params(experiment)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for values in itertools.product(*params.values()):
            overrides = [f"{key}={value}" for key, value in zip(params, values)]
            cfg = compose("config", overrides=[f"+experiment={experiment}", *overrides])
            assert cfg.seed in (0, 1, 2)


def test_a_real_experiment_sweep_reads_back_into_a_report(tmp_path):
    sweep = tmp_path / "sweep"
    run_entry(
        [
            "-m",
            "+experiment=rrhf_online",
            "seed=0,1",
            *SMALL,
            "iterations=2",
            "logger.mode=disabled",
            f"paths.artifacts={tmp_path / 'artifacts'}",
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


def test_a_failing_job_is_recorded_and_the_others_complete(tmp_path):
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
            "algorithm.baseline=sampled_mean,no_such_baseline",
            "iterations=1",
            "logger.mode=disabled",
            f"paths.artifacts={tmp_path / 'artifacts'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0  # the sweep reports that a job failed ...
    assert read_summary(sweep / "0")["iterations"] == 1  # ... after the good job ran to the end
    failure = json.loads((sweep / "1" / "failure.json").read_text())
    assert "no_such_baseline" in failure["error"] and "Traceback" in failure["traceback"]
    assert "algorithm.baseline=no_such_baseline" in failure["overrides"]
