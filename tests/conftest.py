"""Shared fixtures: composing the real Hydra config, and one artifact cache for the session."""

from __future__ import annotations

import os

# as experiments/__init__.py sets it for a job, before torch loads OpenMP: runs in the test workers'
# own processes (run_entry) must not spin idle threads on the cores the other worker uses
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import io
import json
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from backbone.batch import PolicyOutput
from backbone.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
register_configs()
# one intra-op thread: the suite's subprocesses and this process share two cores (see engine.py)
torch.set_num_threads(1)


# pytest-xdist (pyproject.toml: two workers, --dist loadfile) hands out whole files, so a file's
# module fixtures run once, in the order collected. The files that train for a minute or more go
# first, longest first, so that no worker is left running one of them alone at the end; the rest
# keep their order. (A file missing here only balances less well.)
LONG_FILES_FIRST = (
    "test_distributed.py",
    "test_learning.py",
    "test_run.py",
    "test_benchmark.py",
    "test_catalogue.py",
    "test_resume.py",
    "test_experiments.py",
    "test_dpo.py",
    "test_algorithm_contract.py",
    "test_ema_ptx.py",
    "test_console_scripts.py",
    "test_protocol.py",
    "test_export.py",
    "test_lora_stack.py",
    "test_engine.py",
    "test_sweep_report.py",
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return  # one process: the files in their usual order
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides or [])


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    """One SFT / reward-model cache for the whole test run: stages are built once per config.

    Under pytest-xdist each worker is a session of its own, so the workers share one folder beside
    their own temporary folders (the run's, as ``--basetemp`` or ``pytest-N``); the cache's file lock
    per artifact makes one worker build a stage while another that needs it waits, as concurrent
    sweep jobs do (backbone/artifacts.py)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp("artifacts")
    shared = tmp_path_factory.getbasetemp().parent / "artifacts"
    shared.mkdir(exist_ok=True)
    return shared


def run_entry(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m experiments.run ARGS`` as a user types it, parsed by the same ``@hydra.main``, but
    run in this process: the imports (about 10 s of every job) are paid once per test worker. The
    console scripts, the launchers' workers, the kill and DeepSpeed tests still start real processes.
    Fails the test with what the run printed to stderr."""
    from hydra.core.global_hydra import GlobalHydra

    import experiments.run

    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # the run sets its own (engine.cpu_threads)
    GlobalHydra.instance().clear()
    with (
        contextlib.chdir(cwd),
        mock.patch.object(sys, "argv", [experiments.run.__file__, *args]),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            experiments.run.main()
            code = 0
        except SystemExit as exit:  # as the interpreter reads it: None is 0, a message is 1
            code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        finally:
            GlobalHydra.instance().clear()
            torch.set_num_threads(threads)
            # wandb.init exported its service's address: a process this test starts next would log
            # through this one's service, and a run of it that gets killed would hold its id there
            os.environ.pop("WANDB_SERVICE", None)
    result = subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Rows as a JSON-lines file, for ``datasets.load_dataset("json", data_files=...)``; returns its path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def free_port() -> int:
    """A TCP port nobody listens on, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_checkpointed_loss_pass_matches(plain, checkpointed, rollouts) -> None:
    """``gradient_checkpointing``: the stack's loss pass recomputes its layers in backward (a module
    inside the first decoder layer runs twice as often) and changes nothing: the same log-probs, entropy,
    values and gradients as the plain stack's, and eval mode again afterwards."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    results = []
    for stack in (plain, checkpointed):
        layer = next(m for m in stack.actor.modules() if isinstance(m, GradientCheckpointingLayer))
        calls = []
        # a module inside the layer: hooks on the layer itself stay outside the checkpoint
        hook = next(layer.children()).register_forward_hook(lambda *_, calls=calls: calls.append(1))
        out = stack.forward(rollouts, values=True)
        (out.logprobs.sum() + out.entropy.sum() + out.values.sum()).backward()
        hook.remove()
        grads = {name: p.grad for name, p in stack.named_parameters() if p.grad is not None}
        results.append((out, grads, len(calls)))
    (out_p, grads_p, calls_p), (out_c, grads_c, calls_c) = results
    assert calls_p > 0 and calls_c == 2 * calls_p  # twice per pass: forward, and again in backward
    for field in ("logprobs", "entropy", "values"):
        torch.testing.assert_close(getattr(out_c, field), getattr(out_p, field))
    assert grads_p and grads_c.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], msg=lambda m, name=name: f"{name}: {m}")
    assert not any(m.training for role in (checkpointed.actor, checkpointed.critic) for m in role.modules())


class FakePolicy:
    """A policy whose forward returns fixed leaf tensors (log-probs, and values when it has a critic), so
    an algorithm's loss can be checked and its gradients read off them; it records whether each call
    asked for values, and refuses to be asked for values it does not have."""

    def __init__(self, logprobs: torch.Tensor, values: torch.Tensor | None = None):
        self.logprobs = logprobs.clone().requires_grad_(True)
        self.entropy = torch.rand_like(logprobs)
        self.values = None if values is None else values.clone().requires_grad_(True)
        self.asked_values: list[bool] = []

    def forward(self, rollouts, values: bool = False):
        assert not values or self.values is not None, "values asked of a policy without a critic"
        self.asked_values.append(values)
        return PolicyOutput(self.logprobs, self.entropy, self.values if values else None)
