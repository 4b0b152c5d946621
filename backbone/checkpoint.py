"""Checkpoints of an RL run, written so that a kill at any moment leaves the last one intact.

A checkpoint is a folder ``iter-<N>``: the actor (and critic) in Hugging Face format
(safetensors), and ``trainer_state.pt`` with optimiser, schedule, KL controller, reward
statistics, counters, prompt-stream position and RNG states. It is written under a
temporary name and renamed into place, so a half-written checkpoint is never seen.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import torch

from backbone.models import PolicyStack

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2, tokenizer=None):
        self.root = Path(root)
        self.keep = keep
        self.tokenizer = tokenizer

    def save(self, state: dict, stack: PolicyStack, iteration: int) -> Path:
        final = self.root / f"iter-{iteration:06d}"
        tmp = self.root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        stack.actor.save_pretrained(tmp / "actor")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp / "actor")
        if stack.critic is not None:
            stack.critic.save_pretrained(tmp / "critic")
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self.prune()
        log.info("checkpoint written: %s", final)
        return final

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary folders are never listed)."""
        return sorted(p for p in self.root.glob("iter-*") if (p / STATE_FILE).exists())

    def prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
