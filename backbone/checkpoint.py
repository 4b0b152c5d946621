"""Checkpoints of an RL run, written so that a kill at any moment leaves the last one intact.

A checkpoint is a folder ``iter-<N>``: the actor (and critic) in Hugging Face format
(safetensors), usable on their own with ``from_pretrained`` (under ``peft=lora_multi_adapter``
their LoRA adapters, in PEFT's format), and ``trainer_state.pt`` with
everything else a resume needs (KL controller, reward statistics, EMA,
counters, prompt-stream position, RNG states, the W&B run id, the run's config), with the
engine's own optimiser state beside it (``engine.pt``, or DeepSpeed's ``deepspeed/``). It is
written under a temporary name and renamed into place, so a half-written checkpoint is
never seen; ``trainer_state.pt`` is written last, so a folder without it is not complete.

Loading never unpickles code: the state is read with ``torch.load(weights_only=True)``
(tensors, numbers, strings, lists and dicts only) and the weights from safetensors.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from backbone import distributed
from backbone.models import PolicyStack

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
# keys a resumed run may change: where and how it reports, how often it checkpoints
MUTABLE_ON_RESUME = (
    "resume",
    "logger",
    "paths",
    "checkpoint_every",
    "keep_checkpoints",
    "engine.cpu_threads",
)


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2, tokenizer=None):
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep}: at least the last checkpoint must be kept")
        self.root = Path(root)
        self.keep = keep
        self.tokenizer = tokenizer

    def save(self, state: dict, stack: PolicyStack, iteration: int, engine) -> Path:
        """Every rank calls this (DeepSpeed writes each rank's shards); rank 0 exports the weights,
        writes the trainer state last and renames the folder into place."""
        final = self.root / f"iter-{iteration:06d}"
        tmp = Path(distributed.broadcast(str(self.root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")))
        if distributed.is_main():
            tmp.mkdir(parents=True)
        distributed.barrier()
        engine.save_checkpoint(tmp)
        with engine.gathered():
            if distributed.is_main():
                stack.save_trainable(tmp)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp / "actor")
        if not distributed.is_main():  # the ranks' own RNG streams
            torch.save(state, tmp / state_file(distributed.rank()))
        distributed.barrier()
        if distributed.is_main():
            torch.save(state, tmp / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self.prune()
            log.info("checkpoint written: %s", final)
        distributed.barrier()
        return final

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary folders are never listed)."""
        return sorted(p for p in self.root.glob("iter-*") if (p / STATE_FILE).exists())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"trainer_state-rank{rank}.pt"


def load_state(checkpoint: Path) -> dict:
    """This rank's trainer state (ranks differ only in their RNG streams)."""
    return torch.load(checkpoint / state_file(distributed.rank()), map_location="cpu", weights_only=True)


def restore_weights(stack: PolicyStack, checkpoint: Path) -> None:
    """The checkpoint's actor (and critic) weights, copied into the stack's models in place."""
    stack.load_trainable(checkpoint)


def config_changes(saved: dict, current: dict, under: Iterable[str] | None = None) -> list[str]:
    """``key: saved -> current`` for every leaf that differs, outside ``MUTABLE_ON_RESUME`` (and, given
    ``under``, at or below one of those keys)."""
    old, new = dict(_leaves(saved)), dict(_leaves(current))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
        and not is_mutable_on_resume(key)
        and (under is None or _is_under(key, under))
    ]


def is_mutable_on_resume(key: str) -> bool:
    return _is_under(key, MUTABLE_ON_RESUME)


def _is_under(key: str, roots: Iterable[str]) -> bool:
    return any(key == root or key.startswith(f"{root}.") for root in roots)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
