"""The engine steps finite gradients and leaves everything untouched on a non-finite one."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

from backbone.config import EngineConfig, OptimConfig
from backbone.engine import DeepSpeedEngine, TorchEngine, cpu_threads, deepspeed_config, merge_config


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


@pytest.mark.parametrize(
    ("argv", "ranks", "expected"),
    [
        # sys.argv while `python -m experiments.run ...` imports the package: argv[0] is "-m"
        (["-m", "-m", "seed=0,1"], None, "PASSIVE"),  # a sweep's jobs share the cores
        (["-m", "--multirun"], None, "PASSIVE"),
        (["sandbox-run", "-m", "seed=0,1"], None, "PASSIVE"),  # the console script
        (["-m"], "2", "PASSIVE"),  # one of two ranks on this machine
        (["-m", "seed=1"], None, "unset"),  # a job alone: OpenMP's default short spin
        (["-m", "iteration"], "1", "unset"),
    ],
)
def test_processes_that_share_the_cores_make_idle_openmp_threads_sleep(argv, ranks, expected):
    """Set before torch loads (OpenMP reads it once), by importing the entry points' package."""
    code = (
        f"import os, sys; sys.argv = {argv!r}; import experiments; import torch; "
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    )
    unset = ("OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    if ranks is not None:
        env["LOCAL_WORLD_SIZE"] = ranks
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


FAULTS_OF_AN_UPDATE = """
import resource, sys, torch
from backbone.engine import configure_cpu, keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "measured":  # how the memory benchmark configures its measured process
    configure_cpu(torch.device("cpu"), 0, keep_freed=False)
def step():  # an update's activations: blocks of a few MiB, all freed at its end
    blocks = [torch.empty(2**20 + 1024 * i).fill_(1.0) for i in range(40)]
    del blocks
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_the_cpu_allocator_keeps_freed_blocks_so_repeated_steps_do_not_fault_pages_again():
    """Default glibc maps each ~4 MiB block on its own and trims the freed heap: every step faults
    its ~160 MiB in again (about 40,000 pages a step); kept, the steps after the first two reuse them."""

    def run(mode):
        # a fixed mmap threshold, as the memory benchmark's processes start with (MEASURED_ENV): glibc's
        # default raises it once a mapped block is freed, and whether the heap that then holds the blocks
        # is trimmed depends on what lies above them (unkept runs faulted only ~1,060 pages now and then)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_OF_AN_UPDATE, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        applied, faults = out.stdout.split()
        return applied, int(faults)

    applied, faults = run("keep")
    assert applied == "True" and faults < 10_000  # 0 or about 1,060 (a few lazily touched pages)
    for mode in ("plain", "measured"):  # the memory benchmark's peak must follow the live tensors
        applied, faults = run(mode)
        assert applied == "None" and faults > 5 * 20_000


def test_a_users_wait_policy_is_kept():
    code = (
        "import os, sys; sys.argv = ['run.py', '-m']; import experiments; "
        "print(os.environ['OMP_WAIT_POLICY'])"
    )
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


# --------------------------------------------------------------------------- a user's DeepSpeed JSON


def test_a_users_keys_win_and_objects_merge_key_by_key():
    base = {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "bf16": {"enabled": False},
    }
    user = {
        "zero_optimization": {"offload_optimizer": {"pin_memory": True}, "reduce_bucket_size": 5},
        "bf16": True,
    }
    assert merge_config(base, user) == {
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "reduce_bucket_size": 5,
        },
        "bf16": True,  # not an object: replaces the base's
    }
    assert base["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}  # untouched
    assert merge_config(base, {"x": [1, 2]})["x"] == [1, 2]


def user_json(tmp_path, text: str) -> EngineConfig:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return EngineConfig(name="deepspeed", zero_stage=2, deepspeed_config=str(path))


USER_DS = {
    "zero_optimization": {"reduce_bucket_size": 12345},
    "gradient_clipping": 0.25,
    "wall_clock_breakdown": True,
}


def test_the_users_json_is_merged_over_the_built_config(tmp_path):
    optim = OptimConfig(grad_clip=1.0)
    built = deepspeed_config(EngineConfig(name="deepspeed", zero_stage=2), optim, micro_batch_size=4)
    config = deepspeed_config(user_json(tmp_path, json.dumps(USER_DS)), optim, micro_batch_size=4)
    assert config == {**built, **USER_DS, "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345}}
    # the keys the trainer relies on may be repeated as they are, not changed
    same = {"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}
    assert deepspeed_config(user_json(tmp_path, json.dumps(same)), optim, micro_batch_size=4) == built


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"ds\.json: not valid JSON"),
        ("[1]", r"ds\.json: expected a JSON object, found list"),
        (
            '{"gradient_accumulation_steps": 4, "optimizer": {"type": "Adam"}}',
            r"ds\.json: gradient_accumulation_steps, optimizer cannot change",
        ),
        ('{"zero_optimization": {"stage": 3}}', r"ds\.json: zero_optimization\.stage cannot change"),
    ],
)
def test_a_bad_json_names_the_file(tmp_path, text, message):
    folder = re.escape(str(tmp_path))
    with pytest.raises(ValueError, match=rf"engine\.deepspeed_config={folder}/{message}"):
        deepspeed_config(user_json(tmp_path, text), OptimConfig(), 4)
    with pytest.raises(ValueError, match=rf"engine\.deepspeed_config={folder}/missing\.json: cannot be read"):
        deepspeed_config(
            EngineConfig(name="deepspeed", deepspeed_config=str(tmp_path / "missing.json")), OptimConfig(), 4
        )


def _build_engine_on_one_rank(rank: int, port: int, path: str, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = nn.Linear(3, 2)
        engine_cfg = EngineConfig(name="deepspeed", zero_stage=1, deepspeed_config=path)
        engine = DeepSpeedEngine(
            model, [{"params": list(model.parameters()), "lr": 0.1}], OptimConfig(), 10, engine_cfg, 2
        )
        ds = engine.engine
        results.update(
            bucket=ds.zero_reduce_bucket_size(),
            clipping=ds.gradient_clipping(),
            stage=ds.zero_optimization_stage(),
            breakdown=ds.wall_clock_breakdown(),
        )
    finally:
        dist.destroy_process_group()


def test_the_deepspeed_engine_is_built_with_the_users_keys(tmp_path):
    """One CPU rank (gloo) in a process of its own, so no process group outlives the test."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(USER_DS))
    results = mp.Manager().dict()
    mp.spawn(_build_engine_on_one_rank, args=(free_port(), str(path), results), nprocs=1)
    assert dict(results) == {"bucket": 12345, "clipping": 0.25, "stage": 1, "breakdown": True}
