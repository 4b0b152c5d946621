"""Checkpoints of an RL run, written so that a kill at any moment leaves the last one intact.

A checkpoint is a folder ``iter-<N>``: the actor (and critic) in Hugging Face format
(safetensors), usable on their own with ``from_pretrained``, and ``trainer_state.pt`` with
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
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from backbone import distributed
from backbone.models import VALUE_HEAD_FILE, PolicyStack

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
                stack.actor.save_pretrained(tmp / "actor")
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp / "actor")
                if stack.critic is not None:
                    stack.critic.save_pretrained(tmp / "critic")
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
    load_safetensors(stack.actor, checkpoint / "actor")
    if stack.critic is not None:
        load_safetensors(stack.critic.body, checkpoint / "critic", skip=(VALUE_HEAD_FILE,))
        stack.critic.head.load_state_dict(load_file(checkpoint / "critic" / VALUE_HEAD_FILE))


def load_safetensors(model: nn.Module, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Every ``*.safetensors`` shard of a ``save_pretrained`` folder into ``model``. Tied
    parameters (an LM head sharing the embedding) are saved once; the rest must match exactly."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name not in skip:
            state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    named = model.state_dict(keep_vars=True)
    loaded = {id(tensor) for name, tensor in named.items() if name in state}
    untied = [name for name in missing if id(named[name]) not in loaded]
    if untied or unexpected:
        raise ValueError(
            f"{folder}: the checkpoint does not match the model "
            f"(missing {untied[:5]}, unexpected {unexpected[:5]}); was it written by another config?"
        )


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every leaf that differs, outside ``MUTABLE_ON_RESUME``."""
    old, new = dict(_leaves(saved)), dict(_leaves(current))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not is_mutable_on_resume(key)
    ]


def is_mutable_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in MUTABLE_ON_RESUME)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
