"""``python -m experiments.run`` with a fault injected at a chosen point, for the reliability tests.

    python tests/fault_run.py POINT N [hydra overrides...]

POINT is where the N-th occurrence (counted from 1 in this process) is hit:
  generate          SIGKILL on entering the N-th rollout collection (training or evaluation)
  update            SIGKILL on entering the N-th optimiser step
  checkpoint_write  SIGKILL half-way through the N-th torch.save: in training, only the
                    trainer state of a checkpoint is written with it
  nan_loss          the loss of optimiser steps N, N+1, ... (all later ones) is NaN
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone import checkpoint  # noqa: E402
from backbone.rollout import RolloutCollector  # noqa: E402
from backbone.trainer import Trainer  # noqa: E402


def on_call(owner: type, name: str, n: int, fault) -> None:
    """Run ``fault(*args)`` instead of ``owner.name`` from its n-th call on."""
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls >= n:
            return fault(original, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def half_written(original, obj, path):
    buffer = io.BytesIO()
    original(obj, buffer)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    die()


def nan_loss(original, trainer, total):
    return original(trainer, total * float("nan"))


def main() -> None:
    point, n, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if point == "generate":
        on_call(RolloutCollector, "collect", n, die)
    elif point == "update":
        on_call(Trainer, "optimizer_step", n, die)
    elif point == "checkpoint_write":
        on_call(checkpoint.torch, "save", n, half_written)
    elif point == "nan_loss":
        on_call(Trainer, "optimizer_step", n, nan_loss)
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    from experiments.run import main as run_main

    # Hydra finds conf/ relative to the entry module only when that module is __main__
    sys.argv = [sys.argv[0], "--config-path", str(ROOT / "conf"), *overrides]
    run_main()


if __name__ == "__main__":
    main()
