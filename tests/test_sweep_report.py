"""The end of a sweep: report.md in the sweep folder, its path and the verdicts printed, once."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, run_entry
from hydra import compose, initialize_config_dir
from test_run import SMALL

from experiments.sweep_report import SweepReport


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=True)


def verdict_rows(text: str) -> list[str]:
    """The body rows of the markdown verdict tables in `text`."""
    lines = text.splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith(("| id |", "| ---"))]


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory, artifacts_dir) -> tuple[Path, str]:
    """Two seeds on the joblib launcher: what the sweep folder holds and what the sweep printed."""
    sweep = tmp_path_factory.mktemp("parallel") / "sweep"
    result = run_entry(
        [
            "-m",
            "hydra/launcher=local_parallel",
            *SMALL,
            "iterations=1",
            "seed=0,1",
            "seed_scope=rl",  # one SFT and reward model, from the session's cache
            "logger.mode=disabled",
            f"paths.artifacts={artifacts_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=sweep.parent,
    )
    return sweep, result.stdout


def test_a_sweep_ends_with_its_report_and_verdicts(parallel_sweep):
    sweep, stdout = parallel_sweep
    report = sweep / "report" / "report.md"
    text = report.read_text()
    assert "## Runs by series" in text and "Runs: 2 ok" in text  # both jobs, read after both finished
    assert stdout.count("sweep report:") == 1 and f"sweep report: {report}" in stdout
    printed = verdict_rows(stdout[stdout.index("sweep report:") :])
    # the rows this sweep answers, as report.md gives them; none that it does not
    assert printed and all(" | not run | " not in row for row in printed)
    assert all(row in text for row in printed)


def test_a_catalogue_preset_prints_its_own_row(parallel_sweep, capsys):
    sweep, _ = parallel_sweep
    SweepReport().on_multirun_end(compose_with_hydra(["+experiment=kl_penalty", f"hydra.sweep.dir={sweep}"]))
    (row,) = verdict_rows(capsys.readouterr().out)
    assert row.startswith("| kl_penalty | ") and " | not run | " in row  # no kl.coef swept here


def test_the_report_is_off_without_its_callback():
    assert list(compose_with_hydra([]).hydra.callbacks) == ["sweep_report"]
    assert not compose_with_hydra(["~hydra.callbacks.sweep_report"]).hydra.callbacks
