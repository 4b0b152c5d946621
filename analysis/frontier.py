"""The gold-vs-KL frontier (shared/ABLATIONS.md, protocol item 7 and the bon_frontier row).

Gao et al. (2022) compare optimisers of a proxy reward by the gold reward they reach as a function
of sqrt(KL from the initial policy). Here:

- a run's path: its evaluation rows in training order, x = sqrt(max(eval/kl_mean, 0)) (the sampled
  KL estimate can dip below 0), y = eval/gold_mean;
- best-of-n's path (the reference): n = 1, 2, 4, ..., N from the run's `best_of_n.json`, at
  x = sqrt(log n - (n-1)/n); runs that share an SFT and reward model share one curve (its `artifact`),
  counted once;
- gold at a KL budget k: where the path first reaches sqrt(KL) = sqrt(k), linear in sqrt(KL) on the
  segment that crosses it; NaN ("not reached") when it never does, never extrapolated. A mean
  curve is the mean of its runs' paths read this way on a common sqrt(KL) grid.

`gold_at_kl` gives the per-run values (paired with each run's own best-of-n curve via `artifact`),
`gold_at_kl_table` the markdown-ready table, `frontier_figure` the plot, `matched_gold` one run and its
best-of-n curve at the largest KL both reach (the bon_frontier row). No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.records import series
from analysis.stats import band, mean_ci

KL_METRIC = "eval/kl_mean"
GOLD_METRIC = "eval/gold_mean"
# KL budgets (nats) of the table; best-of-256 reaches log 256 - 255/256 = 4.55
KL_BUDGETS = (1.0, 2.0, 4.0, 8.0)
BEST_OF_N = "best-of-n (SFT policy)"
FRONTIER_FILE = "frontier.png"
GRID_POINTS = 101


# --------------------------------------------------------------------------- paths


def run_path(history: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """A run's evaluation rows in training order: x = sqrt(max(KL, 0)), y = gold; each [K]."""
    if KL_METRIC not in history.columns or GOLD_METRIC not in history.columns:
        return np.empty(0), np.empty(0)
    rows = history.dropna(subset=[KL_METRIC, GOLD_METRIC]).sort_values("iteration", kind="stable")
    x = np.sqrt(np.clip(rows[KL_METRIC].to_numpy(dtype=float), 0.0, None))
    return x, rows[GOLD_METRIC].to_numpy(dtype=float)


def first_crossing(x: np.ndarray, y: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """y where the path (x, y) first reaches each target x, linear on the crossing segment; [len(targets)].

    With i the first point where x_i >= t: y_(i-1) + (t - x_(i-1)) / (x_i - x_(i-1)) * (y_i - y_(i-1)).
    NaN where no point reaches t, or where the path starts beyond t (nothing to interpolate from)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = np.full(len(targets), np.nan)
    for j, t in enumerate(targets):
        reached = np.flatnonzero(x >= t)
        if reached.size == 0:
            continue
        i = reached[0]
        if i == 0:
            out[j] = y[0] if x[0] == t else np.nan
        else:
            out[j] = y[i - 1] + (t - x[i - 1]) / (x[i] - x[i - 1]) * (y[i] - y[i - 1])
    return out


def bon_paths(bon: pd.DataFrame | None, runs: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Best-of-n curves, one per artifact (of the runs in `runs`, or all): artifact -> its rows (n,
    sqrt_kl, gold_mean, ...) ordered by n, and the first run that holds it."""
    if bon is None or bon.empty:
        return {}
    if runs is not None:
        bon = bon[bon["run"].astype(str).isin(set(runs["run"].astype(str)))]
    return {
        str(artifact): rows[rows["run"] == rows["run"].iloc[0]].sort_values("n")  # one copy of a shared curve
        for artifact, rows in bon.groupby("artifact", sort=True)
    }


def _xy(curve: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return curve["sqrt_kl"].to_numpy(dtype=float), curve["gold_mean"].to_numpy(dtype=float)


def matched_gold(history: pd.DataFrame, curve: pd.DataFrame) -> tuple[float, float, float]:
    """(sqrt KL, the run's gold, best-of-n's gold) at the largest sqrt(KL) both paths reach: the run's
    own largest, or best-of-N's when the run drifted further; each path read where it first reaches it.
    NaNs when the run has no path."""
    x, y = run_path(history)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    bon_x, bon_y = _xy(curve)
    matched = min(float(x.max()), float(bon_x.max()))
    run_gold, bon_gold = (float(first_crossing(*path, [matched])[0]) for path in ((x, y), (bon_x, bon_y)))
    return matched, run_gold, bon_gold


# --------------------------------------------------------------------------- gold at KL budgets


def gold_at_kl(
    runs: pd.DataFrame, history: pd.DataFrame, bon: pd.DataFrame, budgets: Sequence[float] = KL_BUDGETS
) -> pd.DataFrame:
    """Gold at each KL budget, long form: one row per (series, run, budget) for the RL runs and per
    (artifact, budget) for best-of-n (series `BEST_OF_N`); columns series, run, seed, artifact, kl,
    gold (NaN: not reached). An RL row's `artifact` is its own best-of-n curve's, for paired effects."""
    targets = np.sqrt(np.asarray(budgets, dtype=float))
    histories = {str(r): rows for r, rows in history.groupby("run", sort=False)}
    seeds = dict(zip(runs["run"].astype(str), runs["seed"])) if "seed" in runs.columns else {}
    curves = bon_paths(bon, runs)
    artifact_of = dict(zip(bon["run"].astype(str), bon["artifact"].astype(str))) if curves else {}
    rows = []
    for label, run_ids in series(runs).items():
        for run in map(str, run_ids):
            if run not in histories:
                continue
            x, y = run_path(histories[run])
            if x.size == 0:
                continue
            for kl, gold in zip(budgets, first_crossing(x, y, targets)):
                rows.append(
                    {"series": label, "run": run, "seed": seeds.get(run), "artifact": artifact_of.get(run)}
                    | {"kl": float(kl), "gold": gold}
                )
    for artifact, curve in curves.items():
        run = str(curve["run"].iloc[0])
        for kl, gold in zip(budgets, first_crossing(*_xy(curve), targets)):
            rows.append(
                {"series": BEST_OF_N, "run": run, "seed": seeds.get(run), "artifact": artifact}
                | {"kl": float(kl), "gold": gold}
            )
    return pd.DataFrame(rows, columns=["series", "run", "seed", "artifact", "kl", "gold"])


def _cell(values: np.ndarray) -> str:
    """Mean and 95% t interval of the runs that reached the budget; the censored ones are counted, not
    averaged in (protocol item 5)."""
    missing = int(np.isnan(values).sum())
    if missing == len(values):
        return "not reached"
    text = str(mean_ci(values))
    return text if not missing else f"{text}; {missing} of {len(values)} not reached"


def gold_at_kl_table(
    runs: pd.DataFrame, history: pd.DataFrame, bon: pd.DataFrame, budgets: Sequence[float] = KL_BUDGETS
) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) for a markdown table: per series (and best-of-n, over its distinct curves) the
    gold at each KL budget, mean ± 95% t half-width (n = runs that reached it)."""
    frame = gold_at_kl(runs, history, bon, budgets)
    headers = ["series", "runs", *(f"gold at KL = {kl:g}" for kl in budgets)]
    rows = []
    for label, group in frame.groupby("series", sort=False):
        per_budget = [group.loc[group["kl"] == float(kl), "gold"].to_numpy(dtype=float) for kl in budgets]
        rows.append([label, str(len(per_budget[0])), *map(_cell, per_budget)])
    return headers, rows


# --------------------------------------------------------------------------- the figure


def frontier_figure(
    runs: pd.DataFrame,
    history: pd.DataFrame,
    bon: pd.DataFrame,
    out: Path,
    title: str = "Gold reward vs sqrt(KL from the SFT policy)",
) -> Path:
    """Every series' mean gold on a common sqrt(KL) grid (band: 95% CI over its runs; x: each run's final
    point) and best-of-n's curve (mean over distinct SFT/RM curves), one plot. `out`: a folder (the file
    is `frontier.png` in it) or a `.png` path. Returns the file."""
    out = Path(out)
    path = out if out.suffix == ".png" else out / FRONTIER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    histories = {str(r): rows for r, rows in history.groupby("run", sort=False)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, run_ids in series(runs).items():
        paths = [run_path(histories[r]) for r in map(str, run_ids) if r in histories]
        paths = [(x, y) for x, y in paths if x.size]
        if not paths:
            continue
        grid = np.linspace(0.0, max(float(x.max()) for x, _ in paths), GRID_POINTS)
        mean, half, _ = band(np.array([first_crossing(x, y, grid) for x, y in paths]))
        (line,) = ax.plot(grid, mean, label=f"{label} ({len(paths)})")
        ax.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.plot([x[-1] for x, _ in paths], [y[-1] for _, y in paths], "x", color=line.get_color())
    curves = bon_paths(bon, runs)
    if curves:
        # read every curve at the n of the longest (curves of one N share their points exactly)
        longest = max(curves.values(), key=len)
        x_ref = longest["sqrt_kl"].to_numpy(dtype=float)
        mean, half, _ = band(np.array([first_crossing(*_xy(c), x_ref) for c in curves.values()]))
        ax.plot(x_ref, mean, "k--o", markersize=3, label=f"{BEST_OF_N} ({len(curves)})")
        ax.fill_between(x_ref, mean - half, mean + half, color="k", alpha=0.1, linewidth=0)
        for n, x, y in zip(longest["n"].astype(int), x_ref, mean):
            if n & (n - 1) == 0 and n.bit_length() % 2 == 1 and np.isfinite(y):  # n = 1, 4, 16, 64, 256
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize="x-small")
    ax.set(
        title=f"{title}\nline: mean over the runs that reach each KL; band: 95% CI; x: final points",
        xlabel="sqrt(KL to the SFT policy), sqrt(nats per response)",
        ylabel="gold reward, held-out prompts",
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", title="series (runs)", title_fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
