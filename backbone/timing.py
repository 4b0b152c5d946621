"""Where an iteration's time goes: wall seconds per named phase, accumulated until read.

Phases are timed with ``time.perf_counter``; on CUDA the device is synchronised at both
ends of a phase, so asynchronous kernels are charged to the phase that launched them.
Phases nest: ``generate`` inside ``eval`` is recorded as ``eval/generate`` (and in ``eval``'s
total). The trainer logs ``time/<phase>_s`` per iteration; the benchmark reads the same numbers.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.sync = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.open: list[str] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        self.open.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds["/".join(self.open)] += time.perf_counter() - start
            self.open.pop()

    def pop(self) -> dict[str, float]:
        """``{"time/<phase>_s": seconds}`` accumulated since the last pop; then starts afresh."""
        out = {f"time/{name}_s": s for name, s in self.seconds.items()}
        self.seconds.clear()
        return out
