"""Figures of a sweep, one per question, written as PNG files (matplotlib, Agg backend).

Runs are drawn in series, one per combination of the swept knobs (the algorithm first, then every other
knob that varies, e.g. `ppo_gae, lr=3e-05`); the seeds of a series are aggregated on a common grid of
budget (the units the updates consumed, analysis.records), the fair x-axis for algorithms with
different batch shapes, and for those whose samples are generated up front (an offline buffer) or not at
all (preference pairs): the line is the mean over seeds, the band its 95% interval (no band for a single
seed). The axis is labelled with its unit(s) (`budget (samples; pairs for [dpo, mode=offline])` where the
series count different units: then equal x is equal iterations, not equal data).

- reward vs budget and KL vs budget: `eval/reward_mean`, `eval/kl_mean` against budget;
- reward vs KL (the frontier) and proxy vs gold: one metric against another, the mean path of each
  series from its start (the SFT policy, a circle) plus each run's last-10% mean (crosses);
  proxy vs gold only when the runs log `eval/gold_mean`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.records import budget_label, series
from analysis.stats import band, budget_grid, curve, last_tenth_mean

AXIS_LABELS = {
    "eval/reward_mean": "reward-model score, held-out prompts (eval/reward_mean)",
    "eval/kl_mean": "KL to the SFT policy, nats per response (eval/kl_mean)",
    "eval/gold_mean": "gold reward, held-out prompts (eval/gold_mean)",
}
BAND_NOTE = "line: mean over seeds; band: 95% CI"


def _series_histories(runs: pd.DataFrame, history: pd.DataFrame) -> Iterator[tuple[str, list[pd.DataFrame]]]:
    """(legend label, the series' run histories) for every series that has RL rows."""
    histories = {str(r): rows for r, rows in history.groupby("run", sort=False)}
    for label, run_ids in series(runs).items():
        here = [histories[r] for r in run_ids if r in histories]
        if here:
            yield f"{label} ({len(here)})", here


def _mean_curve(
    histories: list[pd.DataFrame], metric: str, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% half-width across the runs of `metric` on a budget grid."""
    mean, half, _ = band(np.array([curve(h, metric, grid) for h in histories]))
    return mean, half


def _save(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="series (runs)", title_fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_vs_budget(runs: pd.DataFrame, history: pd.DataFrame, metric: str, path: Path, title: str) -> Path:
    """One line per series: `metric` against budget, with the seeds' 95% band."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, histories in _series_histories(runs, history):
        grid = budget_grid(histories)
        mean, half = _mean_curve(histories, metric, grid)
        (line,) = ax.plot(grid, mean, label=label)
        ax.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(title=f"{title}\n{BAND_NOTE}", xlabel=budget_label(runs), ylabel=AXIS_LABELS.get(metric, metric))
    return _save(fig, ax, path)


def metric_vs_metric(
    runs: pd.DataFrame, history: pd.DataFrame, x_metric: str, y_metric: str, path: Path, title: str
) -> Path:
    """One mean path per series through (x, y) over its budget, and every run's last-10% mean."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, histories in _series_histories(runs, history):
        grid = budget_grid(histories)
        x_mean, y_mean = (_mean_curve(histories, m, grid)[0] for m in (x_metric, y_metric))
        (line,) = ax.plot(x_mean, y_mean, label=label)
        color = line.get_color()
        ax.plot(x_mean[:1], y_mean[:1], "o", color=color)
        finals = [(last_tenth_mean(h, x_metric), last_tenth_mean(h, y_metric)) for h in histories]
        ax.plot(*zip(*finals), "x", color=color, markersize=8)
    ax.set(
        title=f"{title}\nline: mean path over seeds from the SFT start (o); x: each run's last-10% mean",
        xlabel=AXIS_LABELS.get(x_metric, x_metric),
        ylabel=AXIS_LABELS.get(y_metric, y_metric),
    )
    return _save(fig, ax, path)


def make_figures(runs: pd.DataFrame, history: pd.DataFrame, out: Path) -> dict[str, Path]:
    """Every figure the runs support, written under `out`; title -> file."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "Reward vs budget": metric_vs_budget(
            runs, history, "eval/reward_mean", out / "reward_vs_budget.png", "Reward vs budget"
        ),
        "KL vs budget": metric_vs_budget(
            runs, history, "eval/kl_mean", out / "kl_vs_budget.png", "KL to the reference vs budget"
        ),
        "Reward vs KL": metric_vs_metric(
            runs,
            history,
            "eval/kl_mean",
            "eval/reward_mean",
            out / "reward_vs_kl.png",
            "Reward vs KL frontier",
        ),
    }
    if "eval/gold_mean" in history.columns and history["eval/gold_mean"].notna().any():
        figures["Proxy vs gold reward"] = metric_vs_metric(
            runs,
            history,
            "eval/reward_mean",
            "eval/gold_mean",
            out / "proxy_vs_gold.png",
            "Proxy (reward model) vs gold reward",
        )
    return figures
