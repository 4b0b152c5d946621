"""`python -m analysis.report` end to end on hand-written run records, and its import weight."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from test_analysis_support import synthetic_run, write_job

from analysis import report
from analysis.claims import REGISTRY
from analysis.records import Records, budget_label, frames_from_records, load_local
from analysis.report import build_report, main

ALGORITHM_GAINS = {"ppo_gae": 1.0, "ppo_sampled": 1.1, "rrhf": 0.9}


@pytest.fixture
def sweep(tmp_path):
    """algorithm=ppo_gae,ppo_sampled,rrhf seed=0,1,2 as job folders 0-8, and a failed job 9."""
    root = tmp_path / "multirun"
    job = 0
    for seed in range(3):
        for algorithm, gain in ALGORITHM_GAINS.items():
            record = synthetic_run(f"job{job}", seed, {"algorithm.name": algorithm}, gain=gain + 0.02 * seed)
            write_job(root / str(job), record)
            job += 1
    write_job(
        root / str(job), synthetic_run("job9", 3, {"algorithm.name": "rrhf"}, failure="ValueError: bad lr")
    )
    return root


def test_report_end_to_end(sweep, capsys):
    assert main([str(sweep)]) == 0
    out = sweep / "report"
    report = (out / "report.md").read_text()
    for png in ("reward_vs_budget.png", "kl_vs_budget.png", "reward_vs_kl.png", "proxy_vs_gold.png"):
        assert (out / png).stat().st_size > 10_000
        assert f"]({png})" in report
    assert "Runs: 9 ok, 1 failed, 0 incomplete" in report
    assert "| series | runs | seeds | budget (samples) |" in report
    assert "| ppo_sampled | 3 | 3 | 1280 |" in report  # series table: runs, seeds, budget
    assert "Budgets in different units" not in report
    assert "ValueError: bad lr" in report
    verdict_lines = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")}
    for row in REGISTRY:
        assert row in verdict_lines
    assert " | supported | " in verdict_lines["three_algorithms"]
    assert " | not run | " in verdict_lines["ema"]
    printed = capsys.readouterr().out
    assert "| three_algorithms |" in printed and "report.md" in printed


def test_mixed_budget_units_are_labelled_and_flagged(tmp_path):
    """Offline DPO-like runs count preference pairs (nothing generated: samples stay 0) beside PPO's
    samples: the axis and the series table name both units, the report and the verdict that compares
    them at equal budget say it is equal iterations, not equal data."""
    root = tmp_path / "multirun"
    for seed in range(3):
        write_job(root / f"ppo{seed}", synthetic_run(f"ppo{seed}", seed, {"algorithm.name": "ppo_gae"}))
        dpo = synthetic_run(
            f"dpo{seed}", seed, {"algorithm.name": "dpo", "algorithm.mode": "offline"}, unit="pairs"
        )
        write_job(root / f"dpo{seed}", dpo)
    records = load_local([root])
    assert set(records.runs["budget_unit"]) == {"samples", "pairs"}
    dpo_history = records.history[records.history["run"].str.endswith("dpo0")]
    assert dpo_history["samples"].max() == 0 and dpo_history["budget"].max() == 1280
    # the series are the algorithms (every dpo run is offline: the mode names no series of its own)
    assert budget_label(records.runs) == "budget (samples; pairs for [dpo])"
    built = build_report(records, tmp_path / "report")
    text = built.path.read_text()
    assert "| series | runs | seeds | budget (samples; pairs for [dpo]) |" in text
    assert "| dpo | 3 | 3 | 1280 |" in text  # budget in pairs, though no sample was generated
    assert "**Budgets in different units** (samples; pairs for [dpo])" in text
    three = next(v for v in built.verdicts if v.id == "three_algorithms")
    assert three.verdict != "not run"
    assert "budgets in different units (samples; pairs for [dpo]): runs cut at 1280 units each" in three.note
    assert "an equal-iteration comparison" in three.note and "not equal data" in three.note


def test_records_without_budgets_still_analyse(tmp_path):
    """Records written before the trainer logged `budget` and `budget_unit`: the loader derives the
    budget (iteration x rollout.samples_per_iteration) and the unit (samples), and the report reads
    them as it reads new records."""
    old, new = tmp_path / "old", tmp_path / "new"
    for seed in range(3):
        for algorithm, gain in ALGORITHM_GAINS.items():
            knobs = {"algorithm.name": algorithm}
            write_job(old / f"{algorithm}{seed}", synthetic_run("r", seed, knobs, gain=gain, unit=None))
            write_job(new / f"{algorithm}{seed}", synthetic_run("r", seed, knobs, gain=gain))
    assert "budget" not in (old / "rrhf0" / "history.jsonl").read_text()
    old_records, new_records = load_local([old]), load_local([new])
    assert set(old_records.runs["budget_unit"]) == {"samples"}
    pd.testing.assert_series_equal(old_records.history["budget"], new_records.history["budget"])
    old_report = build_report(old_records, tmp_path / "old-report")
    new_report = build_report(new_records, tmp_path / "new-report")
    assert "| ppo_sampled | 3 | 3 | 1280 |" in old_report.text
    for old_verdict, new_verdict in zip(old_report.verdicts, new_report.verdicts):
        assert (old_verdict.id, old_verdict.verdict) == (new_verdict.id, new_verdict.verdict)
        assert str(old_verdict.numbers) == str(new_verdict.numbers)


def test_report_out_dir_and_glob(sweep, tmp_path):
    out = tmp_path / "elsewhere"
    assert main([str(sweep / "[0-2]"), "--out", str(out)]) == 0
    assert "Runs: 3 ok, 0 failed" in (out / "report.md").read_text()


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_no_records_exits_2(tmp_path, make, capsys):
    assert main([str(make(tmp_path))]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--wandb", "me/project"])
    assert exc.value.code == 2


def test_report_from_wandb_group(monkeypatch, tmp_path, capsys):
    records = [synthetic_run(f"r{seed}", seed, {"algorithm.name": "rrhf"}) for seed in range(2)]
    runs, history = frames_from_records(records)
    calls = []

    def fake_load_wandb(entity_project, group):
        calls.append((entity_project, group))
        return Records(runs, history, source=f"wandb:{entity_project}/{group}")

    monkeypatch.setattr(report, "load_wandb", fake_load_wandb)
    monkeypatch.chdir(tmp_path)
    assert main(["--wandb", "me/project", "--group", "sweep1"]) == 0
    assert calls == [("me/project", "sweep1")]
    assert "Source: wandb:me/project/sweep1" in (tmp_path / "report-sweep1" / "report.md").read_text()

    def unreachable(entity_project, group):
        raise ConnectionError("no network")

    monkeypatch.setattr(report, "load_wandb", unreachable)
    assert main(["--wandb", "me/project", "--group", "sweep1"]) == 2
    assert "no network" in capsys.readouterr().err


def test_analysis_does_not_import_torch():
    code = "import sys, analysis.report; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
