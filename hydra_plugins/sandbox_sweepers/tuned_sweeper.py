"""``hydra/sweeper=tuned``: compare algorithms at their tuned configs, not at one person's defaults.

AlpacaFarm's practice, as shared/ABLATIONS.md (protocol item 3) states it: every arm gets a tuning grid
of the same size (its learning rate x its main knob), run on tuning seeds and scored on the gold reward;
the best cell of each arm is then run on evaluation seeds disjoint from the tuning ones, and only those
runs are compared. One multirun does both phases through the configured launcher:

    stages     every seed's SFT and reward model, built once   -> <sweep>/stages/<job> (phase=stages)
               in parallel before the RL jobs that share them
    tune       for each arm, every grid cell x tuning seed    -> <sweep>/tune/<job>  (phase=tune)
    pick       per arm, the cell with the highest mean score  -> <sweep>/tuning.json and
               over the tuning seeds                             <sweep>/conf/algorithm/tuned_<arm>.yaml
    evaluate   each arm's picked cell x evaluation seed        -> <sweep>/<job>       (phase=evaluate)

A job's score is what ``experiments.run`` returns: the mean gold gain over the sample budget (area under
the gold curve; the proxy's only on a task without gold), so tuning never rewards hacking the reward
model. A cell whose job failed scores -inf for that seed (it cannot be picked over a cell that ran).
The picked configs are reusable: ``hydra.searchpath=[file://<sweep>/conf] algorithm=tuned_ppo_gae``.
"""

# no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where a
# dataclass cannot resolve string annotations
import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TUNING_FILE = "tuning.json"


@dataclass
class TunedSweeperConf:
    _target_: str = "hydra_plugins.sandbox_sweepers.tuned_sweeper.TunedSweeper"
    # the algorithms compared (config group options of `algorithm`)
    arms: list[str] = field(default_factory=list)
    # per arm: a knob of its algorithm config -> the values to try; every arm's grid has the same size
    grids: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    # seeds the grid runs on, and the disjoint seeds the picked configs are compared on
    tuning_seeds: list[int] = field(default_factory=lambda: [100, 101])
    eval_seeds: list[int] = field(default_factory=lambda: list(range(10)))
    # overrides every job of both phases gets (the row's fixed settings)
    params: dict[str, str] = field(default_factory=dict)


# conf/hydra/sweeper/tuned.yaml extends this schema with the grid of every algorithm
ConfigStore.instance().store(
    group="hydra/sweeper", name="tuned_schema", node=TunedSweeperConf, provider="alignment-sandbox"
)


def grid_cells(grid: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of a grid's values, as override lists (``["algorithm.lr=0.0001", ...]``): a
    tuned arm is one algorithm config, so its grid sweeps that config's own knobs."""
    axes = [[f"algorithm.{knob}={value}" for value in values] for knob, values in grid.items()]
    return [list(cell) for cell in itertools.product(*axes)]


def check_grids(arms: Sequence[str], grids: dict[str, dict[str, list[Any]]]) -> None:
    """Equal effort: each arm has a grid of the same number of cells."""
    if not arms:
        raise ValueError("hydra.sweeper.arms is empty: name the algorithms to compare")
    missing = [arm for arm in arms if arm not in grids]
    if missing:
        raise ValueError(f"hydra.sweeper.grids has no grid for {missing}")
    sizes = {arm: len(grid_cells(grids[arm])) for arm in arms}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"hydra.sweeper.grids: unequal tuning effort, cells per arm {sizes}")


def job_score(result: JobReturn) -> float:
    """A finished job's returned score; -inf for a job that failed or returned none."""
    if result.status != JobStatus.COMPLETED or result.return_value is None:
        return -math.inf
    value = float(result.return_value)
    return value if math.isfinite(value) else -math.inf


def pick(cells: list[list[str]], scores: list[list[float]]) -> tuple[int, list[float]]:
    """The cell with the highest mean score over the tuning seeds (the first of equals), and every mean."""
    means = [sum(s) / len(s) if all(math.isfinite(x) for x in s) else -math.inf for s in scores]
    best = max(range(len(cells)), key=lambda i: (means[i], -i))
    return best, means


class TunedSweeper(Sweeper):
    def __init__(
        self,
        arms: list[str],
        grids: dict[str, dict[str, list[Any]]],
        tuning_seeds: list[int],
        eval_seeds: list[int],
        params: dict[str, str],
    ) -> None:
        self.arms = list(arms)
        self.grids = {arm: {k: list(v) for k, v in grid.items()} for arm, grid in grids.items()}
        self.tuning_seeds = list(tuning_seeds)
        self.eval_seeds = list(eval_seeds)
        self.params = dict(params)
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def fixed_overrides(self, arguments: list[str]) -> list[str]:
        """The row's params and the command line's overrides, each a single value."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        swept = [o.input_line for o in overrides if o.is_sweep_override()]
        if swept:
            raise ValueError(
                f"hydra/sweeper=tuned sweeps the arms, their grids and the seeds itself; {swept} would "
                f"multiply both phases (set hydra.sweeper.grids, tuning_seeds or eval_seeds instead)"
            )
        for override in overrides:
            if override.get_key_element() in ("seed", "algorithm", "phase"):
                raise ValueError(f"hydra/sweeper=tuned sets {override.get_key_element()} itself")
        return [o.input_line for o in overrides]

    def sweep(self, arguments: list[str]) -> Any:
        check_grids(self.arms, self.grids)
        if set(self.tuning_seeds) & set(self.eval_seeds):
            raise ValueError(
                f"hydra.sweeper: tuning_seeds {self.tuning_seeds} and eval_seeds {self.eval_seeds} overlap; "
                f"a config picked on a seed would be judged on it"
            )
        fixed = self.fixed_overrides(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        # stages: one job per seed (no RL), so that the RL jobs of a seed, running in parallel, do not
        # queue on the lock of the artifact one of them is building
        seeds = [*self.tuning_seeds, *self.eval_seeds]
        no_budget = [o for o in fixed if o.split("=")[0].lstrip("+~") not in ("iterations", "total_samples")]
        batch = [
            [
                f"algorithm={self.arms[0]}",
                f"seed={seed}",
                "phase=stages",
                *no_budget,
                "iterations=0",
                "hydra.sweep.subdir=stages/${hydra.job.num}",
            ]
            for seed in seeds
        ]
        self.validate_batch_is_legal(batch)
        log.info("stages: %d jobs (one per seed)", len(batch))
        for result in self.launcher.launch(batch, initial_job_idx=0):
            _ = result.return_value  # a seed whose stages cannot be built stops the sweep here
        job_index = len(batch)

        # tune: every arm's cells x tuning seeds, in one batch so a parallel launcher fills its workers
        cells = {arm: grid_cells(self.grids[arm]) for arm in self.arms}
        tune_jobs = [
            (arm, c, seed) for arm in self.arms for c in range(len(cells[arm])) for seed in self.tuning_seeds
        ]
        batch = [
            [
                f"algorithm={arm}",
                *cells[arm][c],
                f"seed={seed}",
                "phase=tune",
                *fixed,
                "hydra.sweep.subdir=tune/${hydra.job.num}",
            ]
            for arm, c, seed in tune_jobs
        ]
        self.validate_batch_is_legal(batch)
        log.info(
            "tuning: %d jobs (%d arms x %d cells x %d seeds)",
            len(batch),
            len(self.arms),
            len(cells[self.arms[0]]),
            len(self.tuning_seeds),
        )
        tune_results = self.launcher.launch(batch, initial_job_idx=job_index)
        job_index += len(batch)
        scores = {arm: [[] for _ in cells[arm]] for arm in self.arms}
        folders = {arm: [[] for _ in cells[arm]] for arm in self.arms}
        for (arm, c, _seed), result in zip(tune_jobs, tune_results):
            scores[arm][c].append(job_score(result))
            folders[arm][c].append(
                str(Path(result.hydra_cfg.hydra.runtime.output_dir).relative_to(sweep_dir))
            )

        # pick: per arm the best mean score; its resolved algorithm config becomes a reusable option
        tuning = {}
        picked = {}
        for arm in self.arms:
            best, means = pick(cells[arm], scores[arm])
            if not math.isfinite(means[best]):
                raise RuntimeError(
                    f"tuning {arm}: every cell failed on some tuning seed; see {sweep_dir / 'tune'}"
                )
            picked[arm] = cells[arm][best]
            tuning[arm] = {
                "picked": cells[arm][best],
                "score": means[best],
                "cells": [
                    {"overrides": cell, "scores": scores[arm][c], "mean": means[c], "jobs": folders[arm][c]}
                    for c, cell in enumerate(cells[arm])
                ],
            }
            job = next(r for (a, c, _), r in zip(tune_jobs, tune_results) if a == arm and c == best)
            write_tuned_option(sweep_dir, arm, job.cfg.algorithm, tuning[arm], self.tuning_seeds)
        record = {
            "score": "auc_gain/eval/gold_mean: mean gold gain over the sample budget (proxy without gold)",
            "tuning_seeds": self.tuning_seeds,
            "eval_seeds": self.eval_seeds,
            "fixed": fixed,
            "arms": tuning,
        }
        (sweep_dir / TUNING_FILE).write_text(json.dumps(record, indent=2))
        for arm in self.arms:
            log.info("tuned %s: %s (score %.3f)", arm, " ".join(picked[arm]), tuning[arm]["score"])

        # evaluate: the picked cells on the evaluation seeds, numbered after the tuning jobs
        batch = [
            [f"algorithm={arm}", *picked[arm], f"seed={seed}", "phase=evaluate", *fixed]
            for seed in self.eval_seeds
            for arm in self.arms
        ]
        self.validate_batch_is_legal(batch)
        eval_results = self.launcher.launch(batch, initial_job_idx=job_index)
        for result in eval_results:
            _ = result.return_value  # re-raises a failed job's error: the sweep exits non-zero
        return [tune_results, eval_results]


def write_tuned_option(
    sweep_dir: Path, arm: str, algorithm: DictConfig, tuning: dict, seeds: list[int]
) -> Path:
    """``<sweep>/conf/algorithm/tuned_<arm>.yaml``: the picked cell's whole algorithm config."""
    node = OmegaConf.to_container(algorithm, resolve=True, enum_to_str=True)
    schema = f"{node['name']}_schema"
    path = sweep_dir / "conf" / "algorithm" / f"tuned_{arm}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# {arm} tuned on seeds {seeds}: {' '.join(tuning['picked'])}, mean gold gain over the budget "
        f"{tuning['score']:.4g}.\n# Use: hydra.searchpath=[file://{sweep_dir.resolve() / 'conf'}] "
        f"algorithm=tuned_{arm}\n"
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"defaults": [schema], **node})))
    return path
