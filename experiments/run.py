"""Train one algorithm end to end: SFT -> reward model -> RL, with a run record and W&B.

    python -m experiments.run                                   # the default job
    python -m experiments.run algorithm=rrhf iterations=20
    python -m experiments.run -m algorithm=ppo_gae,ppo_sampled,rrhf seed=0,1,2

SFT and reward-model artifacts are cached under ``paths.artifacts``, so every job of a
sweep shares them. The run record (``history.jsonl``, ``summary.json``, ``checkpoints/``)
lands in the job's Hydra output folder; a table of its headline numbers ends the job's log
(analysis.run_summary), and a sweep ends with its report (experiments.sweep_report).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from backbone.config import register_configs

# an absolute path: a console script imports this module by name, and Hydra would read a relative
# config_path as a Python package (pkg://conf), which conf/ is not
CONF = Path(__file__).resolve().parents[1] / "conf"

register_configs()


def refuse_preset_outside_multirun() -> None:
    """A preset of conf/experiment/ is a sweep: its grid is ``hydra.sweeper.params``, which only a
    multirun reads, so without ``-m`` Hydra would run one job that is none of the preset's."""
    hydra_cfg = HydraConfig.get()
    preset = hydra_cfg.runtime.choices.get("experiment")
    if preset is not None and hydra_cfg.mode == RunMode.RUN:
        # SystemExit: the message alone, not a traceback of this check
        raise SystemExit(
            f"error: +experiment={preset} is a sweep: add -m "
            f"(python -m experiments.run -m +experiment={preset})"
        )


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> float | None:
    refuse_preset_outside_multirun()
    # imported here, in the process that runs the job: a sweep's launcher never needs the stack
    from experiments.job import run_job

    return run_job(cfg)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=K`` that the DeepSpeed launcher prepends (Hydra rejects it)."""
    return [a for a in argv if not a.startswith("--local_rank")]


def cli() -> None:
    """``python -m experiments.run`` and the ``sandbox-run`` console script (pyproject.toml), whose
    name Hydra's tab completion is installed for: ``eval "$(sandbox-run -sc install=bash)"``."""
    sys.argv = strip_launcher_args(sys.argv)
    main()


if __name__ == "__main__":
    cli()
