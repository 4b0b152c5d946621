"""The catalogue command and FINDINGS.md: rows run once, resumable, and a page regenerated identically."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_run import SMALL

from analysis.claims import REGISTRY, catalogue
from analysis.findings import (
    DONE,
    judge_row,
    previous_entries,
    provenance,
    row_folders,
    tuned_arms,
    write_findings,
)
from analysis.records import Records, frames_from_records
from backbone.provenance import environment, git_commit
from experiments.catalogue import catalogue_rows, plan, run_sweep

ROWS = ["adam_eps", "ema"]


def test_rows_that_share_their_runs_share_one_sweep(tmp_path):
    rows = ["three_algorithms", "rrhf_fast_but_far", "adam_eps", "multi_adapter_memory", "bon_frontier"]
    sweeps = plan(rows, tmp_path, [])
    assert [s.rows for s in sweeps] == [
        ["three_algorithms", "rrhf_fast_but_far", "bon_frontier"],  # the same tuned runs answer all three
        ["adam_eps"],
        ["multi_adapter_memory"],
    ]
    assert sweeps[0].folder == tmp_path / "three_algorithms"
    assert sweeps[2].benchmark and sweeps[2].command[1:4] == ["-m", "experiments.benchmark", "memory"]
    # the same overrides for every row; seeds named as each row's sweeper names them
    tuned, grid = plan(["three_algorithms", "adam_eps"], tmp_path, ["iterations=2"], seeds=[0, 1])
    assert tuned.command[-2:] == ["iterations=2", "hydra.sweeper.eval_seeds=[0,1]"]
    assert grid.command[-2:] == ["iterations=2", "seed=0,1"]
    # the catalogue writes each report itself (after a failed sweep too), the sweep's callback does not
    assert all("~hydra.callbacks.sweep_report" in sweep.command for sweep in (tuned, grid))
    assert set(catalogue_rows()) == {c.id for c in catalogue()}


def test_a_finished_sweep_asked_for_by_more_rows_answers_them_without_running(tmp_path):
    """`catalogue three_algorithms`, then `catalogue`: the tuned sweep ran for one row; the second call
    must not run it again, and the rows that share its runs must reach the findings."""
    sweep = plan(["three_algorithms", "rrhf_fast_but_far", "bon_frontier"], tmp_path, [])[0]
    sweep.folder.mkdir()
    first = {"rows": ["three_algorithms"], "key": sweep.key, "command": [], "returncode": 0, "wall_s": 1.0}
    (sweep.folder / DONE).write_text(json.dumps(first))
    sweep.command = [sys.executable, "-c", "raise SystemExit(3)"]  # a run would fail and say so
    record = run_sweep(sweep)
    assert record["returncode"] == 0 and record["wall_s"] == 1.0
    assert json.loads((sweep.folder / DONE).read_text())["rows"] == sweep.rows
    assert set(row_folders(tmp_path)) == {"three_algorithms", "rrhf_fast_but_far", "bon_frontier"}


def test_an_unknown_row_or_a_bad_override_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="no_such_row"):
        plan(["no_such_row"], tmp_path, [])
    with pytest.raises(ValueError, match="row adam_eps"):
        plan(["adam_eps"], tmp_path, ["no_such_key=1"])


def catalogue_command(out: Path, findings: Path, artifacts: Path) -> list[str]:
    # 2 iterations of SMALL's 8 samples, evaluated at each, whatever budget a row sets; each seed's
    # stages from the session's cache (a user's paths.artifacts wins over the catalogue's own folder)
    overrides = [*SMALL, "total_samples=16", "rollout.eval_every_samples=8", "logger.mode=disabled"]
    overrides.append(f"paths.artifacts={artifacts}")
    return [
        sys.executable,
        "-m",
        "experiments.catalogue",
        *ROWS,
        *overrides,
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--findings",
        str(findings),
    ]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, artifacts_dir) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("catalogue")
    out, findings = root / "catalogue", root / "FINDINGS.md"
    result = subprocess.run(
        catalogue_command(out, findings, artifacts_dir), cwd=root, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out, findings, result


def test_the_catalogue_runs_each_row_reports_it_and_writes_the_findings(ran):
    out, findings, _ = ran
    for row in ROWS:
        record = json.loads((out / row / "catalogue.json").read_text())
        assert record["rows"] == [row] and record["returncode"] == 0
        assert (out / row / "report" / "report.md").exists()
        assert "sweep report:" not in (out / row / "catalogue.log").read_text()  # built once, not twice
        assert len(list((out / row).glob("[0-9]*/summary.json"))) == 4  # 2 arms x 2 seeds
    page = findings.read_text()
    table = {line.split(" | ")[0].strip("| "): line for line in page.splitlines() if line.startswith("| ")}
    for claim in catalogue():
        assert claim.id in table and f"## {claim.id}" in page and claim.limits in page
    for row in ROWS:
        verdict = table[row].split(" | ")[1]
        assert verdict in ("supported", "contradicted", "inconclusive")
        assert " | 2 | " in table[row]  # n: the two seeds
    assert table["three_algorithms"].split(" | ")[1] == "not run"
    commit, _ = git_commit()
    if commit:
        assert commit[:10] in table["adam_eps"]


def test_a_finished_catalogue_is_not_run_again_and_its_findings_regenerate_identically(ran, artifacts_dir):
    out, findings, _ = ran
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/[0-9]*/summary.json")}
    again = subprocess.run(
        catalogue_command(out, findings, artifacts_dir),
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished before") == len(ROWS)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/[0-9]*/summary.json")} == before
    page = findings.read_text()
    regenerated = write_findings(out, out.parent / "again.md")
    assert regenerated.read_text() == page


def test_rows_a_folder_did_not_run_keep_their_entries(ran, tmp_path):
    """A catalogue run a few rows at a time: rewriting the page from a folder without a row keeps that
    row's entry verbatim; rewriting it from the row's own folder judges it afresh (the same here)."""
    out, findings, _ = ran
    page = tmp_path / "FINDINGS.md"
    page.write_text(findings.read_text())
    (tmp_path / "elsewhere").mkdir()
    write_findings(tmp_path / "elsewhere", page)
    kept = previous_entries(page.read_text())
    assert set(kept) == set(ROWS) and kept == previous_entries(findings.read_text())
    write_findings(out, page)
    assert previous_entries(page.read_text()) == kept
    write_findings(tmp_path / "elsewhere", page, keep=False)
    assert previous_entries(page.read_text()) == {} and page.read_text().count("| not run |") == len(
        catalogue()
    )


def test_a_tuned_rows_entry_names_each_arms_pick_its_grid_edge_and_its_optimizer_steps(tmp_path):
    cell = {"overrides": ["algorithm.lr=0.0001"], "scores": [0.5, 0.3], "mean": 0.4, "jobs": []}
    arms = {
        "ppo_gae": {
            "picked": ["algorithm.lr=0.0003", "algorithm.cliprange=0.1"],
            "score": 1.686,
            "edges": {},
        },
        "rrhf": {"picked": ["algorithm.lr=0.0001"], "score": 0.43, "edges": {"rank_weight": "lowest"}},
    }
    record = {"tuning_seeds": [100, 101], "arms": {a: {**v, "cells": [cell]} for a, v in arms.items()}}
    (tmp_path / "tuning.json").write_text(json.dumps(record))
    runs = pd.DataFrame(
        {
            "path": [str(tmp_path / str(n)) for n in range(5)],
            "algorithm": ["ppo_gae", "ppo_gae", "rrhf", "rrhf", "rrhf"],
            "phase": ["evaluate", "evaluate", "evaluate", "evaluate", "tune"],
            "optimizer_steps": [960, 960, 240, 240, 7],  # the grid run (tune) is not an evaluation run
        }
    )
    assert tuned_arms(runs) == (
        "Tuned arms (picked on tuning seeds 100, 101 by the tuned sweeper's score, the mean gold gain over "
        "the budget): ppo_gae `algorithm.lr=0.0003 algorithm.cliprange=0.1` (score 1.69, 960 optimizer "
        "steps a run); rrhf `algorithm.lr=0.0001` (score 0.43, rank_weight at its grid's lowest value, 240 "
        "optimizer steps a run)."
    )
    (tmp_path / "tuning.json").unlink()
    assert tuned_arms(runs) == ""  # a plain sweep tunes nothing


def test_provenance_names_the_commit_date_and_machine():
    import torch

    env = environment(torch.device("cpu"))
    assert env["cores"] >= 1 and env["cpu"] and env["torch"] == torch.__version__
    assert len(env["date"]) == 10  # ISO date

    runs = pd.DataFrame(
        {
            # the third run has no environment (an older record): NaN in every column
            "environment/date": ["2026-12-01", "2026-12-02", math.nan],
            "environment/commit": ["a" * 40, "a" * 40, math.nan],
            "environment/dirty": [False, True, math.nan],
            "environment/cpu": ["CPU X", "CPU X", math.nan],
            "environment/cores": [2, 2, math.nan],
            "environment/gpu": [None, None, math.nan],
        }
    )
    assert provenance(runs) == {
        "date": "2026-12-01 to 2026-12-02",
        "commit": "aaaaaaaaaa, aaaaaaaaaa+dirty",
        "machine": "CPU X, 2 cores",
    }


def test_a_benchmark_row_cites_the_environment_of_its_results():
    import torch

    env = environment(torch.device("cpu"))
    result = {"mode": "lora_multi_adapter", "update_peak_bytes": 110, "one_model_train_bytes": 100}
    runs, history = frames_from_records([])
    records = Records(runs, history, source="b", benchmarks=[{**result, "environment": env}])
    verdict, where = judge_row(REGISTRY["multi_adapter_memory"], records)
    assert verdict.verdict == "supported"  # 1.1 <= 1.25
    assert where["date"] == env["date"] and env["cpu"] in where["machine"]
