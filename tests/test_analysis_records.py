"""Reading run records: local job folders (incl. failed and unfinished jobs) and W&B runs, into frames."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from test_analysis_support import synthetic_run, write_job

from analysis.records import (
    RunRecord,
    budget_label,
    flatten_config,
    flatten_summary,
    frames_from_records,
    job_folders,
    load_local,
    load_wandb,
    row_keys,
    series,
    swept_knobs,
    unit_label,
)


@pytest.fixture
def sweep(tmp_path):
    """A sweep folder as Hydra lays it out: 0-3 finished, 4 failed (failure.json), 5 killed (no summary)."""
    root = tmp_path / "sweep"
    for job, (algorithm, seed) in enumerate([("ppo_gae", 0), ("ppo_gae", 1), ("rrhf", 0), ("rrhf", 1)]):
        write_job(
            root / str(job),
            synthetic_run(f"j{job}", seed, {"algorithm.name": algorithm, "algorithm.lr": 1e-4}),
        )
    write_job(root / "4", synthetic_run("j4", 2, failure="RuntimeError: CUDA out of memory"))
    killed = root / "5"
    write_job(killed, synthetic_run("j5", 2))
    (killed / "summary.json").write_text(json.dumps({"group": "synthetic", "sft": {"sft/eval_loss": 1.8}}))
    with open(killed / "history.jsonl", "a") as f:
        f.write('{"iteration": 21, "samp')  # the line being written when the job was killed
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_load_sweep_folder(sweep):
    records = load_local([sweep])
    runs = records.runs.set_index(records.runs["path"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert list(runs.index) == ["0", "1", "2", "3", "4", "5"]
    assert runs["status"].to_dict() == {
        "0": "ok",
        "1": "ok",
        "2": "ok",
        "3": "ok",
        "4": "failed",
        "5": "incomplete",
    }
    assert runs.loc["4", "error"] == "RuntimeError: CUDA out of memory"
    assert runs.loc["2", "algorithm"] == "rrhf" and runs.loc["2", "algorithm.name"] == "rrhf"
    assert runs.loc["1", "seed"] == 1 and runs.loc["1", "algorithm.lr"] == 1e-4
    assert runs.loc["0", "rollout.samples_per_iteration"] == 64
    assert runs.loc["0", "sft/eval_loss"] == 1.8 and runs.loc["0", "wall_time_s"] == 12.0
    assert runs.loc["0", "source"] == str(sweep.resolve())
    history = records.history
    assert "sft/step" not in history.columns  # stage rows dropped
    assert set(history["run"]) == set(records.runs["run"])
    one = history[history["run"] == runs.loc["0", "run"]]
    assert one["iteration"].tolist() == list(range(21))
    assert history[history["run"] == runs.loc["5", "run"]]["iteration"].max() == 20  # torn line skipped


def test_job_folders_glob_and_single_job(sweep):
    assert len(job_folders([sweep / "0", sweep / "1"])) == 2
    assert len(job_folders([str(sweep / "[0-2]")])) == 3
    assert len(job_folders([sweep, sweep / "0"])) == 6  # each job once
    with pytest.raises(FileNotFoundError, match="no-such"):
        load_local([sweep / "no-such"])
    with pytest.raises(FileNotFoundError):
        load_local([str(sweep / "x*")])


def test_benchmarks_found_beside_runs(sweep):
    (sweep / "memory_lora.json").write_text(json.dumps({"mode": "lora_multi_adapter", "peak_bytes": 11}))
    assert [b["peak_bytes"] for b in load_local([sweep]).benchmarks] == [11]


def test_flatten_config_and_summary():
    config = {
        "algorithm": {"name": "rrhf", "lr": 1e-4},
        "optim": {"betas": [0.9, 0.95]},
        "seed": 3,
        "_wandb": {},
    }
    assert flatten_config(config) == {
        "algorithm.name": "rrhf",
        "algorithm.lr": 1e-4,
        "optim.betas": "[0.9, 0.95]",
        "seed": 3,
    }
    summary = {"sft": {"sft/eval_loss": 1.5}, "extra": {"x": 1}, "gain/eval/reward_mean": 0.4, "_step": 9}
    assert flatten_summary(summary) == {"sft/eval_loss": 1.5, "extra/x": 1, "gain/eval/reward_mean": 0.4}


def test_frames_from_records_without_runs():
    runs, history = frames_from_records([])
    assert runs.empty and {"run", "status", "algorithm", "seed"} <= set(runs.columns)
    assert history.empty and "iteration" in history.columns


def test_budget_and_its_unit_are_read_or_derived_for_older_records():
    """New records carry `budget` and `budget_unit`; older ones get the budget from iteration x
    rollout.samples_per_iteration (not from `samples`, which an offline buffer spends at iteration 1),
    or from `samples` without that knob, and the unit `samples`."""
    up_front = {"generated": lambda it: 1280 if it else 0}
    new = synthetic_run("new", 0, {"algorithm.name": "rrhf", "algorithm.mode": "offline"}, **up_front)
    old = synthetic_run(
        "old", 0, {"algorithm.name": "rrhf", "algorithm.mode": "offline"}, unit=None, **up_front
    )
    bare = RunRecord(
        "bare",
        "bare",
        "w",
        {},
        {},
        [{"iteration": i, "samples": 8 * i, "eval/reward_mean": 0.0} for i in range(3)],
    )
    runs, history = frames_from_records([new, old, bare])
    assert "budget" not in old.history[1] and old.history[2]["samples"] == 1280
    budget = {run: rows["budget"].tolist() for run, rows in history.groupby("run")}
    assert budget["old"] == budget["new"] == [64 * i for i in range(21)]
    assert budget["bare"] == [0, 8, 16]
    assert runs.set_index("run")["budget_unit"].to_dict() == {
        "new": "samples",
        "old": "samples",
        "bare": "samples",
    }


def test_budget_label_names_every_unit():
    assert unit_label({"ppo_gae": "samples", "rrhf": "samples"}) == "samples"
    assert unit_label({}) == "samples"
    mixed = {"ppo_gae": "samples", "rrhf": "samples", "dpo, mode=offline": "pairs"}
    assert unit_label(mixed) == "samples; pairs for [dpo, mode=offline]"
    # a tie puts samples first; a series whose runs mix units is listed under each
    assert unit_label({"dpo": "pairs", "ppo": "samples"}) == "samples; pairs for [dpo]"
    assert unit_label({"a": "pairs/samples", "b": "samples"}) == "samples; pairs for [a]"
    runs = pd.DataFrame({"run": ["1", "2"], "algorithm": ["ppo_gae", "dpo"]})  # no unit: samples
    assert budget_label(runs) == "budget (samples)"
    assert budget_label(runs.assign(budget_unit=["samples", "pairs"])) == "budget (samples; pairs for [dpo])"


def test_swept_knobs_collapse_algorithm_defaults():
    records = [
        synthetic_run("a", 0, {"algorithm.name": "ppo_gae", "algorithm.lr": 3e-4, "algorithm.gamma": 1.0}),
        synthetic_run("b", 0, {"algorithm.name": "rrhf", "algorithm.lr": 1e-4}),
        synthetic_run("c", 0, {"algorithm.name": "rrhf", "algorithm.lr": 1e-4, "kl.coef": 0.0}),
        synthetic_run("d", 0, {"algorithm.name": "rrhf", "algorithm.lr": 1e-4, "kl.coef": 0.1}),
    ]
    runs, _ = frames_from_records(records)
    # lr and gamma only differ because the algorithm does; kl.coef varies on its own
    assert swept_knobs(runs) == ["algorithm.name", "kl.coef"]
    assert list(series(runs)) == ["ppo_gae", "rrhf, coef=0.0", "rrhf, coef=0.1", "rrhf"]
    tuning = [synthetic_run(str(lr), 0, {"algorithm.lr": lr}) for lr in (1e-3, 3e-5, 1e-4)]
    assert list(series(frames_from_records(tuning)[0])) == [
        "ppo_gae, lr=3e-05",
        "ppo_gae, lr=0.0001",
        "ppo_gae, lr=0.001",
    ]


def test_row_keys_one_per_row_with_missing_values_as_none():
    runs = pd.DataFrame({"a": [1.0, float("nan"), 1.0], "b": ["x", "y", None]})
    assert row_keys(runs, ["a", "b"]) == [(1.0, "x"), (None, "y"), (1.0, None)]
    # no columns: still one (empty) key per row, the one context of a sweep with a single knob
    assert row_keys(runs, []) == [(), (), ()]


class FakeRun(SimpleNamespace):
    def scan_history(self):
        return iter(self.rows)


class FakeApi:
    """The slice of `wandb.Api` that load_wandb uses."""

    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters):
        self.calls.append((path, filters))
        return [r for r in self._runs if r.group == filters["group"]]


def test_load_wandb_converts_like_local():
    record = synthetic_run("abc123", 1, {"algorithm.name": "rrhf"})
    # W&B rows: internal keys, a table's own row (only step keys besides the table), stage rows
    rows = [{**row, "_step": i, "_runtime": 0.5} for i, row in enumerate(record.history)]
    # resumed by an older sandbox: the last two iterations logged before the kill and again after
    stale = [{**row, "rollout/reward_mean": -99.0} for row in rows[-2:]]
    rows[-2:-2] = stale
    rows.append({"iteration": 5, "samples": 320, "samples_table": {"_type": "table-file", "path": "x"}})
    summary = SimpleNamespace(_json_dict=dict(record.summary))
    stage = FakeRun(
        id="sft1", job_type="sft", group="g", config={}, summary=summary, rows=[], state="finished"
    )
    ok = FakeRun(
        id="abc123",
        job_type="rrhf",
        url="https://wandb/abc123",
        state="finished",
        group="g",
        config=dict(record.config),
        summary=summary,
        rows=rows,
    )
    crashed = FakeRun(
        id="dead",
        job_type="ppo_gae",
        url="u",
        state="crashed",
        group="g",
        config={"seed": 0},
        summary=SimpleNamespace(_json_dict={}),
        rows=[],
    )
    other = FakeRun(
        id="x", job_type="rrhf", url="u", state="finished", group="other", config={}, summary=summary, rows=[]
    )
    api = FakeApi([ok, crashed, other, stage])
    records = load_wandb("me/project", "g", api=api)
    assert api.calls == [("me/project", {"group": "g"})]
    assert records.source == "wandb:me/project/g"
    runs = records.runs.set_index("run")
    assert sorted(runs.index) == ["abc123", "dead"]  # the stage run is no job
    assert runs.loc["abc123", "status"] == "ok" and runs.loc["abc123", "algorithm.name"] == "rrhf"
    assert runs.loc["dead", "status"] == "failed" and "crashed" in runs.loc["dead", "error"]
    _, local_history = frames_from_records([record])
    wandb_history = records.history.drop(columns="run").reset_index(drop=True)
    pd.testing.assert_frame_equal(wandb_history, local_history.drop(columns="run"), check_like=True)
