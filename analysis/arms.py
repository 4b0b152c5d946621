"""The arms of an algorithm comparison side by side: what each was tuned to and what it spent.

A comparison is only as fair as its budgets. Per algorithm (the evaluation runs of a sweep), `arms_table`
gives the config its tuning picked (from the sweep's `tuning.json`, written by `hydra/sweeper=tuned`)
and the knobs picked at the lowest or highest value of their grid (its best may lie beyond),
the seeds, the gold and proxy gains and the final KL (mean and 95% interval over seeds, t or sign-flip
as analysis.inference picks and names), the budget each run reached in its unit (samples, or preference
pairs: arms in different units are compared at equal iterations, not equal data), and the compute:
optimizer steps, tokens trained (forward + backward), tokens generated and wall-clock, so an arm that got
four times the gradient steps is visible next to its result. `tuning_table` shows every arm's grid:
each cell's score per tuning seed, the pick.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.inference import interval
from analysis.records import BUDGET, units_of
from analysis.stats import gain

TUNING_FILE = "tuning.json"
GAINS = (("gold", "eval/gold_mean"), ("proxy", "eval/reward_mean"))
COMPUTE = (
    ("optimizer steps", "optimizer_steps"),
    ("tokens trained", "tokens_trained"),
    ("tokens generated", "tokens"),
    ("wall-clock (s)", "wall_time_s"),
)


def of_phase(runs: pd.DataFrame, phase: str = "evaluate") -> pd.DataFrame:
    """The runs of one phase of a sweep: "evaluate", the runs a comparison is judged on (a tuned sweep's
    picked arms on the evaluation seeds, or every run of a plain sweep, which has no phase), or "tune"
    (a tuned sweep's grid); never a tuned sweep's stage builds ("stages")."""
    if "phase" not in runs.columns:
        return runs
    return runs[runs["phase"].fillna("evaluate") == phase]


def read_tuning(runs: pd.DataFrame) -> dict:
    """The `tuning.json` of each sweep the runs came from (a job's folder is `<sweep>/<num>`), merged."""
    arms = {}
    for folder in sorted({str(Path(p).parent) for p in runs["path"]}):
        file = Path(folder) / TUNING_FILE
        if file.exists():
            record = json.loads(file.read_text())
            arms.update(
                {
                    arm: {**tuned, "tuning_seeds": record["tuning_seeds"]}
                    for arm, tuned in record["arms"].items()
                }
            )
    return arms


def arms_table(runs: pd.DataFrame, history: pd.DataFrame, tuning: dict) -> tuple[list[str], list[list]]:
    """Headers and one row per algorithm of the ok evaluation runs."""
    ok = of_phase(runs[runs["status"] == "ok"])
    histories = {str(r): rows for r, rows in history.groupby("run", sort=False)}
    headers = ["arm", "config", "grid edge", "seeds", *(f"{name} gain" for name, _ in GAINS), "final KL"]
    headers += ["budget", *(name for name, _ in COMPUTE)]
    rows = []
    for algorithm, arm in ok.groupby("algorithm", sort=True):
        here = [histories[str(r)] for r in arm["run"] if str(r) in histories]
        tuned = tuning.get(algorithm, {})
        picked, edges = tuned.get("picked"), tuned.get("edges", {})
        edge = ", ".join(f"{knob} ({side})" for knob, side in edges.items()) or ("none" if tuned else "-")
        row = [algorithm, " ".join(picked) if picked else "as configured", edge, arm["seed"].nunique()]
        row += [interval(gain(h, metric) for h in here) for _, metric in GAINS]
        row.append(interval(arm["final/eval/kl_mean"]) if "final/eval/kl_mean" in arm else "n/a")
        units = "/".join(sorted(set(units_of(arm).values())))
        row.append(f"{sum(h[BUDGET].max() for h in here) / len(here):.4g} {units}" if here else "n/a")
        row += [f"{arm[column].mean():.4g}" if column in arm else "n/a" for _, column in COMPUTE]
        rows.append(row)
    return headers, rows


def tuning_table(tuning: dict) -> tuple[list[str], list[list]]:
    """Headers and one row per grid cell: its overrides, score per tuning seed, mean, and the pick."""
    headers = ["arm", "cell", "score per tuning seed", "mean score", "picked"]
    rows = [
        [
            arm,
            " ".join(cell["overrides"]),
            ", ".join(f"{s:.3g}" for s in cell["scores"]),
            cell["mean"],
            "yes" if cell["overrides"] == record["picked"] else "",
        ]
        for arm, record in tuning.items()
        for cell in record["cells"]
    ]
    return headers, rows
