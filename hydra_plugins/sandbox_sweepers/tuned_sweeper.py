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
    extend     (``extend_edges`` rounds, 0 by default) an arm picked at the edge of a numeric axis gets
               that axis extended one step beyond it (the ratio of its two outermost values), the new
               cells are tuned, and the pick is made again
    evaluate   each arm's picked cell x evaluation seed        -> <sweep>/<job>       (phase=evaluate)

A job's score is what ``experiments.run`` returns: the mean gold gain over the sample budget (area under
the gold curve; the proxy's only on a task without gold), so tuning never rewards hacking the reward
model. A cell whose job failed scores -inf for that seed (it cannot be picked over a cell that ran).
The picked configs are reusable: ``hydra.searchpath=[file://<sweep>/conf] algorithm=tuned_ppo_gae``.

A pick at the edge of its grid (the largest learning rate tried, say) says the arm's best may lie beyond
it, and a comparison of that arm is then a comparison at a grid, not at a tuned config: ``tuning.json``
names each pick's edges (``edges``: knob -> "lowest" / "highest") and the report prints them. Extending
gives the arms that need it more cells than the others (equal effort becomes "tuned until interior");
``tuning.json`` records each arm's cells, so the effort spent is in the record either way.
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
    # rounds of extending an axis whose edge value was picked (0: report edges only)
    extend_edges: int = 0


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


def edges(grid: dict[str, list[Any]], cell: list[str]) -> dict[str, str]:
    """The numeric axes of `grid` (two values or more) whose value in `cell` is their lowest or highest."""
    found = {}
    for knob, values in grid.items():
        numbers = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
        if len(numbers) < 2 or len(numbers) < len(values):
            continue
        picked = next(o.split("=", 1)[1] for o in cell if o.split("=", 1)[0] == f"algorithm.{knob}")
        if picked == str(numbers[0]):
            found[knob] = "lowest"
        elif picked == str(numbers[-1]):
            found[knob] = "highest"
    return found


def beyond(values: list[Any], side: str) -> int | float:
    """One step past the `side` end of a numeric axis: by the ratio of its two outermost values when
    they are positive (1e-4, 3e-4 -> 9e-4 or 3.33e-5), else by their difference; integers stay integers."""
    ordered = sorted(values)
    edge, inner = (ordered[-1], ordered[-2]) if side == "highest" else (ordered[0], ordered[1])
    step = edge * (edge / inner) if edge > 0 and inner > 0 else edge + (edge - inner)
    if all(isinstance(v, int) for v in values):
        step = round(step)
        if step == edge:  # 1, 2 -> 0 or 3: a rounding must still move
            step = edge + (1 if side == "highest" else -1)
    return float(f"{step:.3g}") if isinstance(step, float) else step


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
        extend_edges: int = 0,
    ) -> None:
        self.arms = list(arms)
        self.extend_edges = extend_edges
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

        # tune: every arm's cells x tuning seeds, in one batch so a parallel launcher fills its workers;
        # then pick, and (extend_edges) tune the cells beyond an edge that was picked, and pick again
        grids = {arm: {k: list(v) for k, v in self.grids[arm].items()} for arm in self.arms}
        results: dict[tuple[str, tuple[str, ...], int], JobReturn] = {}
        for round_ in range(self.extend_edges + 1):
            cells = {arm: grid_cells(grids[arm]) for arm in self.arms}
            tune_jobs = [
                (arm, tuple(cell), seed)
                for arm in self.arms
                for cell in cells[arm]
                for seed in self.tuning_seeds
                if (arm, tuple(cell), seed) not in results
            ]
            batch = [
                [
                    f"algorithm={arm}",
                    *cell,
                    f"seed={seed}",
                    "phase=tune",
                    *fixed,
                    "hydra.sweep.subdir=tune/${hydra.job.num}",
                ]
                for arm, cell, seed in tune_jobs
            ]
            self.validate_batch_is_legal(batch)
            log.info("tuning round %d: %d jobs", round_, len(batch))
            results.update(zip(tune_jobs, self.launcher.launch(batch, initial_job_idx=job_index)))
            job_index += len(batch)
            picked = {arm: self.pick_arm(arm, cells[arm], results, sweep_dir) for arm in self.arms}
            at_edge = {arm: edges(grids[arm], picked[arm]["picked"]) for arm in self.arms}
            if round_ == self.extend_edges or not any(at_edge.values()):
                break
            for arm, sides in at_edge.items():
                for knob, side in sides.items():
                    grids[arm][knob].append(beyond(grids[arm][knob], side))
                    log.info("%s picked %s at its %s: extending to %s", arm, knob, side, grids[arm][knob][-1])

        tuning = {}
        for arm in self.arms:
            tuning[arm] = {**picked[arm], "edges": at_edge[arm], "grid": grids[arm]}
            for knob, side in at_edge[arm].items():
                log.warning("tuned %s: %s picked at the %s value of its grid", arm, knob, side)
            best = next(
                r for (a, cell, _), r in results.items() if a == arm and list(cell) == tuning[arm]["picked"]
            )
            write_tuned_option(sweep_dir, arm, best.cfg.algorithm, tuning[arm], self.tuning_seeds)
        picked = {arm: tuning[arm]["picked"] for arm in self.arms}
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
        return [list(results.values()), eval_results]

    def pick_arm(
        self, arm: str, cells: list[list[str]], results: dict[tuple, JobReturn], sweep_dir: Path
    ) -> dict:
        """`arm`'s pick among `cells` from its tuning jobs' scores: the picked cell, its score, every cell."""
        scores = [
            [job_score(results[(arm, tuple(cell), seed)]) for seed in self.tuning_seeds] for cell in cells
        ]
        best, means = pick(cells, scores)
        if not math.isfinite(means[best]):
            raise RuntimeError(
                f"tuning {arm}: every cell failed on some tuning seed; see {sweep_dir / 'tune'}"
            )

        def folder(result: JobReturn) -> str:
            return str(Path(result.hydra_cfg.hydra.runtime.output_dir).relative_to(sweep_dir))

        return {
            "picked": cells[best],
            "score": means[best],
            "cells": [
                {
                    "overrides": cell,
                    "scores": scores[c],
                    "mean": means[c],
                    "jobs": [folder(results[(arm, tuple(cell), seed)]) for seed in self.tuning_seeds],
                }
                for c, cell in enumerate(cells)
            ],
        }


def write_tuned_option(
    sweep_dir: Path, arm: str, algorithm: DictConfig, tuning: dict, seeds: list[int]
) -> Path:
    """``<sweep>/conf/algorithm/tuned_<arm>.yaml``: the picked cell's whole algorithm config."""
    node = OmegaConf.to_container(algorithm, resolve=True, enum_to_str=True)
    schema = node["name"]  # the registered option it extends
    path = sweep_dir / "conf" / "algorithm" / f"tuned_{arm}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# {arm} tuned on seeds {seeds}: {' '.join(tuning['picked'])}, mean gold gain over the budget "
        f"{tuning['score']:.4g}.\n# Use: hydra.searchpath=[file://{sweep_dir.resolve() / 'conf'}] "
        f"algorithm=tuned_{arm}\n"
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"defaults": [schema], **node})))
    return path
