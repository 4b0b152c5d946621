"""`python -m analysis.report` end to end on hand-written run records, and its import weight."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_analysis_support import synthetic_run, write_job

from analysis import report
from analysis.claims import REGISTRY
from analysis.records import Records, frames_from_records
from analysis.report import main

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
    for png in ("reward_vs_samples.png", "kl_vs_samples.png", "reward_vs_kl.png", "proxy_vs_gold.png"):
        assert (out / png).stat().st_size > 10_000
        assert f"]({png})" in report
    assert "Runs: 9 ok, 1 failed, 0 incomplete" in report
    assert "| ppo_sampled | 3 | 3 | 1280 |" in report  # series table: runs, seeds, samples
    assert "ValueError: bad lr" in report
    verdict_lines = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")}
    for row in REGISTRY:
        assert row in verdict_lines
    assert " | supported | " in verdict_lines["three_algorithms"]
    assert " | not run | " in verdict_lines["ema"]
    printed = capsys.readouterr().out
    assert "| three_algorithms |" in printed and "report.md" in printed


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
