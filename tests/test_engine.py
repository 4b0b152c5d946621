"""The engine steps finite gradients and leaves everything untouched on a non-finite one."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from backbone.config import EngineConfig, OptimConfig
from backbone.engine import TorchEngine, cpu_threads, deepspeed_config


def engine_and_model() -> tuple[TorchEngine, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    engine = TorchEngine(
        model, [{"params": list(model.parameters()), "lr": 0.1}], OptimConfig(), total_steps=10
    )
    return engine, model


def test_a_finite_gradient_is_stepped_and_its_norm_returned():
    engine, model = engine_and_model()
    before = copy.deepcopy(model.state_dict())
    engine.backward(model(torch.ones(4, 3)).sum())
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert abs(engine.step() - expected) < 1e-5
    assert not torch.equal(model.weight, before["weight"])
    assert engine.scheduler.last_epoch == 1


def test_a_non_finite_gradient_skips_the_step():
    engine, model = engine_and_model()
    engine.backward(model(torch.ones(4, 3)).sum())
    engine.step()
    weights, optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(engine.optimizer.state_dict())
    engine.backward(model(torch.tensor([[1.0, float("inf"), 0.0]])).sum())
    assert engine.step() is None
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert engine.optimizer.state_dict()["state"][0]["step"] == optimizer["state"][0]["step"]
    assert engine.scheduler.last_epoch == 1
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step


def test_the_deepspeed_config_is_built_from_the_hydra_one():
    engine = EngineConfig(name="deepspeed", zero_stage=3, offload_optimizer=True, offload_param=True)
    engine.precision = "bf16"
    config = deepspeed_config(engine, OptimConfig(grad_clip=0.5), micro_batch_size=4)
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert config["gradient_clipping"] == 0.5 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["bf16"] == {"enabled": True} and not config["fp16"]["enabled"]
    assert config["gradient_accumulation_steps"] == 1  # one optimiser step per minibatch


@pytest.mark.parametrize(
    ("cores", "jobs", "env", "expected"),
    [
        (8, 1, {}, 8),  # one job: every core it may use
        (8, 2, {}, 4),  # a parallel launcher's two jobs share them
        (2, 4, {}, 1),  # never fewer than one
        (8, 1, {"LOCAL_SIZE": "2"}, 4),  # two deepspeed ranks on this machine
        (8, 2, {"LOCAL_WORLD_SIZE": "2"}, 2),  # torchrun's name for it, and two jobs
    ],
)
def test_auto_threads_share_the_cores_between_jobs_and_local_ranks(monkeypatch, cores, jobs, env, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cpu_threads("auto", jobs) == expected
    assert cpu_threads(3, jobs) == 3  # a number is taken as it is


@pytest.mark.parametrize("bad", ["four", -1, 1.5, True])
def test_bad_thread_settings_name_the_key(bad):
    with pytest.raises(ValueError, match=r"engine\.cpu_threads"):
        cpu_threads(bad)


def test_the_entry_points_make_idle_openmp_threads_sleep():
    """Set before torch loads (OpenMP reads it once), by importing the entry points' package."""
    code = "import os, sys; import experiments; import torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
