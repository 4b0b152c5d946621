"""Synthetic run records shared by the analysis tests (no tests here).

`synthetic_run` makes the record of one job whose eval curves follow a known shape, so a test knows what
"last-10% mean", "gain" or "samples-to-half-gain" must be; `write_job` puts a record on disk the way
`python -m experiments.run` lays out a job folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from analysis.records import RunRecord

INITIAL_REWARD, INITIAL_GOLD = -2.0, -1.0
# per-seed sizes of a synthetic effect: the same sign in every seed (clear), or seeds that disagree
EFFECT = {
    "supported": (1.0, 1.1, 0.9),
    "contradicted": (-1.0, -1.1, -0.9),
    "inconclusive": (1.0, -1.0, 0.2),
}
CASES = tuple(EFFECT)


def shape(t: float, speed: float) -> float:
    """Share of the gain reached at fraction t of the run: linear for speed 0, faster early for speed > 0."""
    if abs(speed) < 1e-9:
        return t
    return (1 - math.exp(-speed * t)) / (1 - math.exp(-speed))


def nest(dotted: Mapping[str, Any]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: a config as Hydra writes it."""
    config: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return config


def synthetic_run(
    run: str,
    seed: int,
    knobs: Mapping[str, Any] | None = None,
    *,
    gain: float = 1.0,
    speed: float = 0.0,
    kl: float = 1.0,
    gold: float | None = 0.5,
    iterations: int = 20,
    samples_per_iteration: int = 64,
    eval_every: int = 2,
    wiggle: float = 0.0,
    train: Mapping[str, Callable[[int, float], float]] | None = None,
    evals: Mapping[str, Callable[[int, float], float]] | None = None,
    failure: str | None = None,
    unit: str | None = "samples",
    generated: Callable[[int], int] | None = None,
) -> RunRecord:
    """One job: eval/reward_mean rises from -2 by `gain` with shape(t, speed), plus a zigzag of
    +-`wiggle` from one eval to the next; eval/kl_mean rises by `kl` linearly, eval/gold_mean from -1 by
    `gold`; `train` and `evals` add (or replace) metrics f(iteration, t) in training and eval rows. A job
    with a `failure` stops half way without an end-of-run summary.

    Its rows carry `budget` = iteration x samples_per_iteration in `unit` (the summary's `budget_unit`)
    and `samples` = `generated(iteration)`: by default the budget for samples, none for `pairs`; an
    offline buffer's is the whole budget from iteration 1. `unit=None`: a record written before the
    trainer logged budgets, with neither `budget` nor `budget_unit`."""
    if generated is None:
        generated = (lambda it: 0) if unit == "pairs" else (lambda it: it * samples_per_iteration)
    knobs = {"algorithm.name": "ppo_gae", **(knobs or {})}
    config = nest(
        {
            **knobs,
            "rollout.samples_per_iteration": samples_per_iteration,
            "rollout.eval_every": eval_every,
            "paths.artifacts": "artifacts",
        }
    )
    config.update(seed=seed, iterations=iterations)
    rows = [{"sft/step": 1, "sft/loss": 2.0}]
    last = iterations // 2 if failure else iterations
    for it in range(last + 1):
        t = it / iterations
        reward = INITIAL_REWARD + gain * shape(t, speed)
        row: dict[str, Any] = {"iteration": it, "samples": generated(it), "tokens": it * 640}
        if unit is not None:
            row["budget"] = it * samples_per_iteration
        row["time/elapsed_s"] = 0.1 * it
        if it > 0:
            row.update({"rollout/reward_mean": reward, "train/loss": 0.5})
            row.update({k: f(it, t) for k, f in (train or {}).items()})
        if it % eval_every == 0 or it == iterations:
            zigzag = wiggle * (-1) ** (it // eval_every)
            row.update({"eval/reward_mean": reward + zigzag, "eval/kl_mean": kl * t})
            if gold is not None:
                row["eval/gold_mean"] = INITIAL_GOLD + gold * shape(t, speed)
            row.update({k: f(it, t) for k, f in (evals or {}).items()})
        rows.append(row)
    summary: dict[str, Any] = {"group": "synthetic", "name": run, "sft": {"sft/eval_loss": 1.8}}
    if failure is None:
        summary.update(algorithm=knobs["algorithm.name"], seed=seed, samples=generated(last))
        if unit is not None:
            summary.update(budget=last * samples_per_iteration, budget_unit=unit)
        summary.update({"wall_time_s": 12.0, "final/eval/reward_mean": rows[-1]["eval/reward_mean"]})
    return RunRecord(
        run=run, path=run, source="synthetic", config=config, summary=summary, history=rows, failure=failure
    )


def write_job(folder: Path, record: RunRecord) -> Path:
    """Lay `record` out as a job folder of a Hydra sweep: .hydra/config.yaml, history.jsonl, summary.json."""
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(dict(record.config)))
    (folder / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in record.history))
    (folder / "summary.json").write_text(json.dumps(record.summary, indent=2))
    if record.failure:
        traceback = f"Traceback (most recent call last):\n  ...\n{record.failure}\n"
        (folder / "failure.json").write_text(json.dumps({"traceback": traceback}))
    return folder
