"""Tracker against real offline wandb: what W&B received is read back from the run's `.wandb` file.

wandb 0.31 has no Python reader for that file (the old `wandb.sdk.internal.datastore` went with the
Python backend), so `offline_records` reads its leveldb-log framing and parses each record with
`wandb.proto.wandb_internal_pb2.Record`, the same protobuf `wandb sync` uploads.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import wandb
from wandb_records import items_of, offline_records, records_of, run_id_of

from backbone.tracking import Tracker, step_metric_for

IDENTITY = dict(
    project="tracking-test",
    entity=None,
    group="sweep-7",
    job_type="ppo_gae",
    name="ppo_gae-s0",
    tags=["test", "seed0"],
)
CONFIG = {"seed": 0, "algorithm": {"name": "ppo_gae", "lr": 1e-4}, "iterations": 3}
# wandb's own folders, pointed at a temporary one; and variables that would override what a test passes
WANDB_HOME_VARS = ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
WANDB_RUN_VARS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY")
WANDB_RUN_VARS += ("WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_TAGS", "WANDB_RUN_ID", "WANDB_RESUME")


@pytest.fixture(autouse=True, scope="module")
def _wandb_sandbox(tmp_path_factory: pytest.TempPathFactory):
    """Keep wandb's own folders out of the repo and the home folder, and its env out of the tests."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        for var in WANDB_HOME_VARS:
            mp.setenv(var, str(home))
        for var in WANDB_RUN_VARS:
            mp.delenv(var, raising=False)
        # wandb reads the environment once, when its process-wide singleton is set up
        wandb.teardown()
        yield
        wandb.teardown()


def _tracker(run_dir: Path, mode: str = "offline", **kwargs: Any) -> Tracker:
    return Tracker(run_dir, mode=mode, **{**IDENTITY, "config": CONFIG, **kwargs})


def _history_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


# the step keys as the trainer logs them; `samples` jumps as an offline buffer's does (generated up
# front), `budget` grows by the iteration's units
ROWS = [
    {
        "iteration": 0,
        "budget": 0,
        "samples": 0,
        "tokens": 0,
        "time/elapsed_s": 0.1,
        "eval/reward_mean": np.float32(0.25),
    },
    {
        "iteration": 1,
        "budget": 64,
        "samples": 128,
        "tokens": 4096,
        "time/elapsed_s": 1.5,
        "train/loss": float("nan"),
    },
    {
        "iteration": 2,
        "budget": 128,
        "samples": 128,
        "tokens": 4096,
        "time/elapsed_s": 2.5,
        "train/loss": np.float64(0.5),
    },
]


def test_offline_run_gets_identity_config_rows_and_step_metrics(tmp_path: Path) -> None:
    with _tracker(tmp_path) as tracker:
        tracker.log({"sft/step": 1, "sft/loss": 2.0})
        for row in ROWS:
            tracker.log(row)
    records = offline_records(tmp_path)

    (run,) = records_of(records, "run")
    assert (run.run_id, run.project, run.run_group, run.job_type, run.display_name) == (
        tracker.run_id,
        "tracking-test",
        "sweep-7",
        "ppo_gae",
        "ppo_gae-s0",
    )
    assert list(run.tags) == ["test", "seed0"]
    config = items_of(run.config.update)
    assert {k: config[k] for k in CONFIG} == CONFIG

    history = [items_of(h.item) for h in records_of(records, "history")]
    assert [h.get("budget") for h in history[1:]] == [0, 64, 128]
    assert [h.get("samples") for h in history[1:]] == [0, 128, 128]
    assert history[0]["sft/loss"] == 2.0 and "budget" not in history[0] and "samples" not in history[0]
    assert history[1]["eval/reward_mean"] == 0.25 and math.isnan(history[2]["train/loss"])

    # RL keys, the other counters included, are plotted against the budget; stage keys against their step
    step_of = {m.name: m.step_metric for m in records_of(records, "metric") if m.name}
    rl_keys = ("iteration", "samples", "tokens", "time/elapsed_s", "train/loss", "eval/reward_mean")
    assert {step_of[k] for k in rl_keys} == {"budget"}
    assert (step_of["sft/loss"], step_of["budget"], step_of["sft/step"]) == ("sft/step", "", "")
    assert records_of(records, "exit")[0].exit_code == 0

    # the local record: the same rows in order, NaN as null, readable by pandas
    local = _history_jsonl(tmp_path)
    assert local[0] == {"sft/step": 1, "sft/loss": 2.0}
    assert local[1:] == [
        {**ROWS[0], "eval/reward_mean": 0.25},
        {**ROWS[1], "train/loss": None},
        {**ROWS[2], "train/loss": 0.5},
    ]
    frame = pd.read_json(tmp_path / "history.jsonl", lines=True)
    assert frame["budget"].tolist()[1:] == [0, 64, 128] and math.isnan(frame["train/loss"][2])


def test_step_metric_is_the_budget_for_rl_keys_and_the_stage_step_for_stage_keys() -> None:
    for key in ("eval/gold_mean", "train/loss", "samples", "iteration", "tokens", "time/elapsed_s"):
        assert step_metric_for(key) == "budget"
    assert (step_metric_for("sft/loss"), step_metric_for("rm/eval_accuracy")) == ("sft/step", "rm/step")
    assert {step_metric_for(k) for k in ("budget", "sft/step", "rm/step")} == {None}


def test_summary_is_merged_locally_and_in_wandb(tmp_path: Path) -> None:
    with _tracker(tmp_path) as tracker:
        tracker.summary({"algorithm": "ppo_gae", "eval/gold_mean": 0.25, "gain": {"eval/gold_mean": 0.1}})
        tracker.summary({"eval/gold_mean": np.float32(0.5), "wall_s": float("inf")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "algorithm": "ppo_gae",
        "eval/gold_mean": 0.5,
        "gain": {"eval/gold_mean": 0.1},
        "wall_s": None,
    }
    sent: dict[str, Any] = {}
    for summary in records_of(offline_records(tmp_path), "summary"):
        sent.update(items_of(summary.update))
    assert sent["algorithm"] == "ppo_gae" and sent["eval/gold_mean"] == 0.5 and sent["wall_s"] == math.inf


def test_table_is_logged_at_its_step_and_mirrored(tmp_path: Path) -> None:
    step = {"iteration": 5, "samples": 640}
    with _tracker(tmp_path) as tracker:
        tracker.log_table(
            "eval/samples", ["prompt", "response", "reward"], [["2+2", "4", np.float32(1.0)]], step
        )
    (line,) = (tmp_path / "tables" / "eval" / "samples.jsonl").read_text().splitlines()
    assert json.loads(line) == {
        **step,
        "columns": ["prompt", "response", "reward"],
        "rows": [["2+2", "4", 1.0]],
    }
    (row,) = [items_of(h.item) for h in records_of(offline_records(tmp_path), "history")]
    assert row["eval/samples/_type"] == "table-file" and row["eval/samples/nrows"] == 1
    assert (row["iteration"], row["samples"]) == (5, 640)


def test_sequential_trackers_do_not_leak(tmp_path: Path) -> None:
    first = _tracker(tmp_path / "job0")
    first.log({"iteration": 0, "samples": 0})
    # job 0 never finished (its `finally` did not run): job 1 must still get a run of its own
    second = _tracker(tmp_path / "job1", job_type="rrhf")
    second.log({"iteration": 0, "samples": 32})
    second.finish()
    first.finish()
    assert first.run_id != second.run_id
    for job, run_id, samples in (("job0", first.run_id, 0), ("job1", second.run_id, 32)):
        records = offline_records(tmp_path / job)
        assert records_of(records, "run")[0].run_id == run_id
        assert [items_of(h.item)["samples"] for h in records_of(records, "history")] == [samples]
        assert _history_jsonl(tmp_path / job) == [{"iteration": 0, "samples": samples}]


def test_exception_in_context_finishes_with_exit_code_1(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), _tracker(tmp_path) as tracker:
        tracker.log({"iteration": 0, "samples": 0})
        raise RuntimeError("training died")
    tracker.finish()  # a second finish (e.g. in a `finally`) is harmless
    assert records_of(offline_records(tmp_path), "exit")[0].exit_code == 1


def test_disabled_mode_writes_only_the_local_record(tmp_path: Path) -> None:
    with _tracker(tmp_path, mode="disabled") as tracker:
        tracker.log({"iteration": 0, "samples": 0})
        tracker.log_table("samples", ["prompt"], [["hi"]], {"iteration": 0, "samples": 0})
        tracker.summary({"seed": 0})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "history.jsonl",
        "summary.json",
        "tables/samples.jsonl",
    ]
    assert len(tracker.run_id) == 8


def test_disabled_rank_writes_nothing(tmp_path: Path) -> None:
    with _tracker(tmp_path / "run", enabled=False) as tracker:
        tracker.log({"iteration": 0, "samples": 0})
        tracker.log_table("samples", ["prompt"], [["hi"]], {"iteration": 0})
        tracker.summary({"seed": 0})
        tracker.truncate_history("iteration", 0)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def unreachable_server(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    wandb.teardown()
    yield monkeypatch
    monkeypatch.undo()
    wandb.teardown()


@pytest.mark.parametrize("api_key", [None, "x" * 40], ids=["no-key", "fake-key"])
def test_failing_wandb_init_warns_and_keeps_the_local_record(
    tmp_path: Path,
    unreachable_server: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    api_key: str | None,
) -> None:
    if api_key:
        unreachable_server.setenv("WANDB_API_KEY", api_key)
    with (
        caplog.at_level(logging.WARNING, logger="backbone.tracking"),
        _tracker(tmp_path, mode="online") as tracker,
    ):
        tracker.log({"iteration": 0, "samples": 0})
        tracker.summary({"seed": 0})
    assert "continues on its local record" in caplog.text and "wandb sync" in caplog.text
    assert _history_jsonl(tmp_path) == [{"iteration": 0, "samples": 0}]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"seed": 0}


def test_failing_wandb_log_mid_run_keeps_the_local_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _tracker(tmp_path) as tracker:
        tracker.log({"iteration": 0, "samples": 0})
        wandb.finish()  # W&B goes away under the tracker: its next log raises
        with caplog.at_level(logging.WARNING, logger="backbone.tracking"):
            tracker.log({"iteration": 1, "samples": 64})
            tracker.log({"iteration": 2, "samples": 128})
    assert caplog.text.count("W&B log failed") == 1
    assert [r["samples"] for r in _history_jsonl(tmp_path)] == [0, 64, 128]


def test_truncate_history_for_resume(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path, mode="disabled")
    tracker.log({"sft/step": 1, "sft/loss": 1.0})
    for iteration in range(5):
        tracker.log({"iteration": iteration, "samples": 64 * iteration})
        tracker.log_table("samples", ["prompt"], [["hi"]], {"iteration": iteration})
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"iteration": 5, "sam')  # the line a killed job was writing
    tracker.truncate_history("iteration", 2)
    assert _history_jsonl(tmp_path) == [{"sft/step": 1, "sft/loss": 1.0}] + [
        {"iteration": i, "samples": 64 * i} for i in range(3)
    ]
    tables = (tmp_path / "tables" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in tables] == [0, 1, 2]
    # a resumed job appends after the kept rows
    tracker.log({"iteration": 3, "samples": 192})
    assert _history_jsonl(tmp_path)[-1] == {"iteration": 3, "samples": 192}
    tracker.finish()


def _wandb_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [items_of(h.item) for h in records_of(offline_records(run_dir), "history")]


def test_resume_rebuilds_one_offline_run_with_each_row_once(tmp_path: Path) -> None:
    table = (["prompt"], [["hi"]])
    first = _tracker(tmp_path)
    for iteration in range(4):
        first.log_table("eval/samples", *table, {"iteration": iteration, "samples": 64 * iteration})
        first.log({"iteration": iteration, "samples": 64 * iteration, "train/loss": float("nan")})
    first.finish(exit_code=1)  # killed after iteration 3, with its last checkpoint at iteration 1
    wandb.teardown()  # the killed process's folder is complete on disk
    with _tracker(tmp_path, resume_id=first.run_id) as resumed:
        resumed.rewind("iteration", 1)
        for iteration in (2, 3):
            resumed.log_table("eval/samples", *table, {"iteration": iteration, "samples": 64 * iteration})
            resumed.log({"iteration": iteration, "samples": 64 * iteration, "train/loss": 0.5})
    assert resumed.run_id == first.run_id
    assert [row["iteration"] for row in _history_jsonl(tmp_path)] == [0, 1, 2, 3]
    # one offline folder, the one `wandb sync` uploads, holding every row once, in order
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert run_id_of(folder) == first.run_id
    rows = _wandb_rows(tmp_path)
    assert {run.run_id for run in records_of(offline_records(tmp_path), "run")} == {first.run_id}
    metrics = [row for row in rows if "train/loss" in row]
    tables = [row for row in rows if "eval/samples/_type" in row]
    assert [row["iteration"] for row in metrics] == [row["iteration"] for row in tables] == [0, 1, 2, 3]
    assert [row["iteration"] for row in rows] == [0, 0, 1, 1, 2, 2, 3, 3]  # each table before its row
    assert math.isnan(metrics[1]["train/loss"]) and metrics[2]["train/loss"] == 0.5
