"""``python -m experiments.run`` that also leaves each rank's trainable weights behind, for the
distributed tests: ``deepspeed --num_gpus 2 tests/rank_probe.py [hydra overrides...]`` writes
``<run folder>/params-rank<r>.pt`` after training (whole weights, gathered under ZeRO-3)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone import distributed  # noqa: E402
from backbone.trainer import Trainer  # noqa: E402


def run_and_dump(run):
    def wrapper(trainer: Trainer) -> dict:
        summary = run(trainer)
        with trainer.engine.gathered():
            params = {name: p.detach().clone() for name, p in trainer.stack.named_parameters()}
        torch.save(params, trainer.checkpoints.root.parent / f"params-rank{distributed.rank()}.pt")
        return summary

    return wrapper


if __name__ == "__main__":
    Trainer.run = run_and_dump(Trainer.run)
    from experiments.run import main

    overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    # Hydra finds conf/ relative to the entry module only when that module is __main__
    sys.argv = [sys.argv[0], "--config-path", str(ROOT / "conf"), *overrides]
    main()
