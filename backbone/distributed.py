"""Data-parallel ranks: who this process is, and the few collectives the RL loop needs.

A process without ``torch.distributed`` is rank 0 of 1 and every function is the identity,
so the single-process path runs the same code. Launched by ``deepspeed`` (or ``torchrun``),
every rank runs the whole loop on its shard of the prompts; rank 0 alone writes the record.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of ``items``: every world_size-th one, from its rank on."""
    return items[rank() :: world_size()]


def barrier() -> None:
    if initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    if not initialized():
        return values
    # NCCL reduces CUDA tensors only; gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def sum_over_ranks(value: float) -> float:
    return _reduce([value], dist.ReduceOp.SUM)[0]


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (a decision every rank must take the same way)."""
    return _reduce([float(flag)], dist.ReduceOp.MIN)[0] == 1.0


def mean_over_ranks(row: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that logged it (ranks hold equal shards, so a mean of means
    is the mean over the union)."""
    if not initialized():
        return row
    rows: list[dict[str, float]] = [{} for _ in range(world_size())]
    dist.all_gather_object(rows, row)
    keys = dict.fromkeys(k for r in rows for k in r)  # first-seen order
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
