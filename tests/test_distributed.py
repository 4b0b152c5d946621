"""Data-parallel training for real: 2 CPU ranks under the DeepSpeed launcher (gloo), ZeRO 2 and 3,
full models and (ZeRO-3) the one-base LoRA stack.

Each rank generates for its share of the prompts; DeepSpeed all-reduces the gradients, so both
ranks must end with identical weights; rank 0 alone writes the record; a run stopped and
started again continues exactly. And the statistics the ranks share (advantage whitening)
equal one process's over the union of their data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, read_history, read_summary
from safetensors.torch import load_file
from test_run import SMALL

from backbone.ops import masked_whiten

PROBE = Path(__file__).with_name("rank_probe.py")
ITERATIONS = 3


def deepspeed_run(run_dir: Path, artifacts: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        *SMALL,
        f"iterations={ITERATIONS}",
        "checkpoint_every=1",
        "keep_checkpoints=3",
        "logger.mode=disabled",
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(PROBE), *args]
    result = subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def rl_rows(run_dir: Path) -> list[dict]:
    keep = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    return [keep(row) for row in read_history(run_dir) if "iteration" in row]


@pytest.mark.parametrize(
    ("stage", "peft"),
    [
        (2, "none"),
        # ZeRO-3's partitioning, gathering and synced generation are run by the LoRA case too
        pytest.param(3, "none", marks=pytest.mark.slow),
        (3, "lora_multi_adapter"),
    ],
)
def test_two_rank_ppo_keeps_the_ranks_identical_and_resumes_exactly(tmp_path, artifacts_dir, stage, peft):
    run_dir = tmp_path / "run"
    options = [f"engine=deepspeed_zero{stage}", f"peft={peft}"]
    deepspeed_run(run_dir, artifacts_dir, *options)
    ranks = [torch.load(run_dir / f"params-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any("critic" in k for k in ranks[0])
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    rows = rl_rows(run_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS + 1))  # rank 0 alone wrote them
    assert [r["samples"] for r in rows] == [0, 8, 16, 24]  # the ranks' shares add up
    summary = read_summary(run_dir)
    assert summary["iterations"] == ITERATIONS and summary["samples"] == 24
    checkpoint = run_dir / "checkpoints" / f"iter-{ITERATIONS:06d}"
    assert (checkpoint / "deepspeed" / "ds_config.json").exists()
    if peft == "none":
        exported = load_file(checkpoint / "actor" / "model.safetensors")  # whole, even under ZeRO-3
        assert all(torch.equal(v, ranks[0][f"actor.{k}"]) for k, v in exported.items())
    else:  # the actor's adapter alone, gathered from the shards
        exported = load_file(checkpoint / "actor" / "adapter_model.safetensors")
        assert exported and all("lora_" in k for k in exported)
        assert all(v.abs().sum() > 0 for k, v in exported.items() if "lora_B" in k)  # it trained
    # stopped after iteration 2 (its last checkpoint gone): started again, it continues exactly
    shutil.rmtree(checkpoint)
    for rank_file in run_dir.glob("params-rank*.pt"):
        rank_file.unlink()
    deepspeed_run(run_dir, artifacts_dir, *options)
    assert rl_rows(run_dir) == rows
    again = load_file(next((checkpoint / "actor").glob("*.safetensors")))
    assert all(torch.equal(again[k], exported[k]) for k in exported)


# --------------------------------------------------------------------------- shared statistics

VALUES = torch.tensor(
    [[1.0, -2.0, 0.5, 0.0], [3.0, 1.5, 0.0, 0.0], [-1.0, 4.0, 2.0, 0.5], [0.2, 0.0, 0.0, 0.0]]
)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)


def _whiten_on_rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = slice(2 * rank, 2 * rank + 2)  # rank 0 holds rows 0-1, rank 1 rows 2-3
        results[rank] = masked_whiten(VALUES[rows], MASK[rows])
    finally:
        dist.destroy_process_group()


def test_whitening_over_two_ranks_equals_one_process_on_the_union():
    results = mp.Manager().dict()
    mp.spawn(_whiten_on_rank, args=(free_port(), results), nprocs=2)
    together = torch.cat([results[0], results[1]])
    # the reference, by hand over the masked entries of the union
    entries = [VALUES[i, t].item() for i in range(4) for t in range(4) if MASK[i, t]]
    mean = sum(entries) / len(entries)
    var = sum((x - mean) ** 2 for x in entries) / len(entries)
    for i in range(4):
        for t in range(4):
            expected = (VALUES[i, t].item() - mean) / (var + 1e-8) ** 0.5 if MASK[i, t] else 0.0
            assert together[i, t].item() == pytest.approx(expected, abs=1e-6)
