"""Resume and faults, on real training subprocesses: kill -9 at chosen and random moments, SIGTERM,
a half-written checkpoint, NaN losses. On CPU with one thread a run is deterministic, so a run
that was killed and resumed must write the same history and end with the same weights as one
that never stopped: every quantity matches exactly, none only in distribution."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_history, read_summary, run_entry
from safetensors.torch import load_file
from test_run import SMALL
from wandb_records import items_of, offline_records, records_of, run_id_of

from backbone.checkpoint import CheckpointManager, load_state

FAULT_RUN = Path(__file__).with_name("fault_run.py")
ITERATIONS = 6


def run_args(artifacts_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *SMALL,
        f"iterations={ITERATIONS}",
        "checkpoint_every=2",
        "logger.mode=offline",
        f"paths.artifacts={artifacts_dir}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def fault_run(point: str, n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FAULT_RUN), point, str(n), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def comparable(rows: list[dict]) -> list[dict]:
    """RL rows without wall-clock readings, the one thing a resumed run cannot repeat. (Stage rows
    are written by whichever run built the shared SFT and reward-model artifacts.)"""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows if "iteration" in row]


def iterations_of(run_dir: Path) -> list[int]:
    return [row["iteration"] for row in read_history(run_dir) if "iteration" in row]


def final_actor(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"iter-{ITERATIONS:06d}" / "actor" / "model.safetensors")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert iterations_of(run_dir) == list(range(ITERATIONS + 1))  # each exactly once
    assert comparable(read_history(run_dir)) == comparable(read_history(reference))
    ours, theirs = final_actor(run_dir), final_actor(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def wandb_folders(run_dir: Path, run_id: str) -> list[Path]:
    return [folder for folder in (run_dir / "wandb").glob("offline-run-*") if run_id_of(folder) == run_id]


def wandb_iterations(run_dir: Path, run_id: str) -> list[int]:
    """The iterations of the metric rows (not the tables' own rows) that `wandb sync` would upload."""
    history = [items_of(h.item) for h in records_of(offline_records(run_dir, run_id), "history")]
    return [row["iteration"] for row in history if "rollout/reward_mean" in row or "eval/reward_mean" in row]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, artifacts_dir) -> Path:
    """The same run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_entry(run_args(artifacts_dir, run_dir), cwd=run_dir)
    return run_dir


def test_killed_during_generation_update_and_checkpoint_write_resumes_exactly(
    tmp_path, artifacts_dir, reference
):
    run_dir = tmp_path / "run"
    args = run_args(artifacts_dir, run_dir)
    # 8th collection: iteration 4's rollout (evaluation collects twice at iterations 0 and 2)
    assert fault_run("generate", 8, args, tmp_path).returncode == -signal.SIGKILL
    assert iterations_of(run_dir) == [0, 1, 2, 3]
    first_id = read_summary(run_dir)["run_id"]
    # resumed at 2; the 11th optimiser step is in iteration 5 (4 steps per iteration)
    assert fault_run("update", 11, args, tmp_path).returncode == -signal.SIGKILL
    assert iterations_of(run_dir) == [0, 1, 2, 3, 4]
    # resumed at 4; the first torch.save is the final checkpoint's engine state
    assert fault_run("checkpoint_write", 1, args, tmp_path).returncode == -signal.SIGKILL
    checkpoints = CheckpointManager(run_dir / "checkpoints")
    assert list((run_dir / "checkpoints").glob(".tmp-iter-000006-*"))  # the write that died
    assert checkpoints.latest().name == "iter-000004"  # and the previous one is still whole
    assert load_state(checkpoints.latest())["iteration"] == 4
    run_entry(args, cwd=tmp_path)  # resumes at 4 and completes
    assert_same_run(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert read_summary(run_dir)["run_id"] == first_id
    # four processes, one W&B run in one offline folder, rebuilt by each resume: every iteration once
    assert len(wandb_folders(run_dir, first_id)) == 1
    assert wandb_iterations(run_dir, first_id) == list(range(ITERATIONS + 1))


def test_sigterm_checkpoints_the_current_iteration_and_resumes(tmp_path, artifacts_dir, reference):
    run_dir = tmp_path / "run"
    args = run_args(artifacts_dir, run_dir)
    cmd = [sys.executable, "-m", "experiments.run", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = run_dir / "history.jsonl"
    while proc.poll() is None and not (history.exists() and 1 in iterations_of(run_dir)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: stopped after iteration" in stdout  # and how to continue
    stopped_at = iterations_of(run_dir)[-1]
    assert stopped_at < ITERATIONS
    assert CheckpointManager(run_dir / "checkpoints").latest().name == f"iter-{stopped_at:06d}"
    run_entry(args, cwd=tmp_path)
    assert_same_run(run_dir, reference)
    run_id = read_summary(run_dir)["run_id"]
    assert len(wandb_folders(run_dir, run_id)) == 1
    assert wandb_iterations(run_dir, run_id) == list(range(ITERATIONS + 1))


@pytest.mark.slow
def test_random_kills_resume_exactly(tmp_path, artifacts_dir, reference):
    """kill -9 at random moments of training until the run completes; then the same history and
    weights. Each process is killed at a random moment of the iteration after its first new
    checkpoint (an iteration takes 0.1-0.4 s at this size on 2 cores), so the kills land in
    generation, update, evaluation or a checkpoint write alike, and every cycle moves on."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", *run_args(artifacts_dir, run_dir, "checkpoint_every=1")]
    rng = random.Random(0)
    kills = 0
    checkpoints = CheckpointManager(run_dir / "checkpoints")
    while True:
        before = checkpoints.latest()
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and checkpoints.latest() == before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        proc.kill()
        proc.wait()
        kills += 1
    assert kills >= 3
    assert_same_run(run_dir, reference)
    print(f"{kills} kill -9 cycles, then complete and identical")  # shown with -s


def test_nan_losses_are_skipped_counted_and_stop_the_run_with_a_checkpoint(tmp_path, artifacts_dir):
    run_dir = tmp_path / "run"
    args = run_args(
        artifacts_dir, run_dir, "checkpoint_every=1", "keep_checkpoints=10", "optim.max_nonfinite_steps=6"
    )
    # every step from the 5th on is NaN: iteration 1 trains, iteration 2 skips all 4 steps, iteration 3
    # stops at the 6th in a row
    result = fault_run("nan_loss", 5, args, tmp_path)
    assert result.returncode != 0
    failure = json.loads((run_dir / "failure.json").read_text())
    assert "NonFiniteTraining" in failure["error"] and "6 optimiser steps in a row" in failure["error"]
    rows = {row["iteration"]: row for row in read_history(run_dir) if "iteration" in row}
    assert rows[1]["train/nonfinite_steps"] == 0 and "train/loss" in rows[1]
    assert rows[2]["train/nonfinite_steps"] == 4 and "train/loss" not in rows[2]
    assert rows[3]["train/nonfinite_steps"] == 2
    # skipped steps never reached the weights: iterations 2 and 3 end where iteration 1 did
    after = [load_file(run_dir / f"checkpoints/iter-{i:06d}/actor/model.safetensors") for i in (1, 2, 3)]
    assert all(torch.equal(after[0][k], later[k]) for later in after[1:] for k in after[0])
    assert load_state(run_dir / "checkpoints" / "iter-000003")["nonfinite_steps"] == 6
    # the optimiser took exactly the 4 finite steps: the schedule and Adam's step count stand still
    engine = torch.load(run_dir / "checkpoints/iter-000003/engine.pt", weights_only=True)
    assert {int(s["step"]) for s in engine["optimizer"]["state"].values()} == {4}
    assert engine["scheduler"]["last_epoch"] == 4


def test_a_finished_run_resumes_as_configured_and_refuses_other_configs(tmp_path, artifacts_dir, reference):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    before, name = read_history(run_dir), read_summary(run_dir)["name"]
    # resume=<folder> alone: the checkpoint's own config; reporting may change, the run may not
    run_entry([f"resume={run_dir}", "logger.mode=disabled"], cwd=tmp_path)
    assert read_history(run_dir) == before  # nothing left to do, nothing written twice
    assert read_summary(run_dir)["name"] == name and f"iterations={ITERATIONS}" in name  # as first named
    # the command that started it, with resume= added: its overrides repeat the run's own values
    run_entry([*run_args(artifacts_dir, run_dir), f"resume={run_dir}"], cwd=tmp_path)
    assert read_history(run_dir) == before
    refused = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"resume={run_dir}", f"iterations={ITERATIONS}", "seed=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert f"resume={run_dir} continues the run as it was configured; seed: 0 -> 1: cannot change" in (
        refused.stderr
    )
    # the same folder with another config is not silently continued
    args = run_args(artifacts_dir, run_dir, "algorithm.lr=0.001")
    refused = subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert f"{run_dir} holds a run with another config (algorithm.lr: 0.0003 -> 0.001)" in refused.stderr
