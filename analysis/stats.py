"""Per-run measures of a metric's history and their aggregation across seeds.

A run's history is its frame of RL rows (`iteration`, `budget`, metrics), in iteration order; a metric
is read from the rows that have it (an eval metric is on eval rows only). Every measure "in budget" reads
the `budget` column (analysis.records: the budget units the updates consumed, in the run's unit, samples
or pairs; records that predate it get it from the loader), never `samples`, the responses generated, which
an offline buffer spends up front and preference pairs not at all. The `samples_*` names are kept from
when the two were the same; they measure budget.

- `last_tenth_mean` (the "last-10% mean"; not the run record's `final/`, which is the last evaluation):
  the mean of the metric over the rows whose iteration lies in the last 10% of the run's iterations
  (iteration > 0.9 * last iteration); when none of them has the metric (an eval every 5 iterations in
  a 30-iteration run), the last row that has it.
- `initial_value`: the value at iteration 0 (the SFT policy's evaluation); `gain` = last-10% mean - initial.
- `samples_to_level` (budget to a level): the first budget at which the metric, linearly interpolated
  between its rows, reaches a level; +inf (censored: never reached within the run's budget) when it
  does not. `samples_to_half_gain` is it at initial + gain / 2 (censored when the gain is not positive);
  `at_level` reads another metric at that budget, `value_at` a metric at a given one.
- `first_value`: the mean over the first 10% of the iterations (the counterpart of `last_tenth_mean`, for
  metrics without an iteration-0 row, such as training ones); `change` = last-10% mean - first.
- `early_mean`: the mean over the rows within the first fraction of the run's budget.
- `variation`: the coefficient of variation (sd / mean, ddof=1) of a series over iterations, a
  scale-free spread that rescaling the series leaves unchanged.
- `step_std`: the standard deviation of the iteration-to-iteration changes of a series (its first
  differences), a roughness measure that a steady trend does not inflate.
- `mean_ci`: the mean across seeds and the half-width of its 95% Student-t interval (or another
  confidence c), t.ppf((1 + c) / 2, n-1) * sd / sqrt(n) with the sample sd (ddof=1). One value (n=1)
  has no interval: the half-width is NaN, and the verdicts read that as "cannot tell the effect from
  the noise".
  A censored value (±inf) has no mean: `mean_ci` refuses it.
- `censored_summary`: values some of which are censored (+inf: never reached) are summarised by their
  median with the censored ones ranked last, and the counts reached and censored, never by a mean.
- `interpolate` / `band`: curves of several runs on a common budget grid (`budget_grid`; NaN outside a
  run's own range, never extrapolated), and their mean and interval at every grid point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as st

from analysis.records import BUDGET

TENTH = 0.1


@dataclass(frozen=True)
class CI:
    """A mean across seeds with the half-width of its 95% interval (NaN for fewer than two values)."""

    mean: float
    half: float
    n: int

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if np.isnan(self.half):
            return f"{self.mean:.3g} (n={self.n})"
        return f"{self.mean:.3g} ± {self.half:.2g} (n={self.n})"


def band(matrix: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise mean, half-width of the t interval at `confidence` and count of a (runs x points)
    array, ignoring NaN."""
    matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
    n = np.sum(~np.isnan(matrix), axis=0)
    # a column of equal values has that value as its mean and no spread, exactly: summing 5 x 1/9 and
    # dividing leaves a rounding residue that would print as "0.111 ± 1.4e-17"
    lowest = np.where(np.isnan(matrix), np.inf, matrix).min(axis=0)
    constant = lowest == np.where(np.isnan(matrix), -np.inf, matrix).max(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(constant, lowest, np.nansum(matrix, axis=0) / n)
        sd = np.where(constant, 0.0, np.sqrt(np.nansum((matrix - mean) ** 2, axis=0) / (n - 1)))
        half = st.t.ppf((1 + confidence) / 2, n - 1) * sd / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return np.where(n >= 1, mean, np.nan), half, n


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> CI:
    """Mean and Student-t half-width at `confidence` of `values` (NaN values are left out); ValueError
    on a censored (infinite) value, which must never be averaged as if reached."""
    array = np.asarray(list(values), dtype=float)
    array = array[~np.isnan(array)]
    if np.isinf(array).any():
        raise ValueError("censored (infinite) values have no mean: use censored_summary")
    if array.size == 0:
        return CI(float("nan"), float("nan"), 0)
    mean, half, n = band(array[:, None], confidence)
    return CI(float(mean[0]), float(half[0]), int(n[0]))


@dataclass(frozen=True)
class Censored:
    """Values of which some are censored (±inf: beyond the budget, side known, size not): the median
    with censored values ranked at their end (finite while fewer than half are censored on one side),
    the counts of measured and censored values, and of seeds without a value (`undecided`, NaN)."""

    median: float
    measured: int
    censored: int
    undecided: int = 0

    def __str__(self) -> str:
        counts = f"{self.measured} measured, {self.censored} censored"
        if self.undecided:
            counts += f", {self.undecided} undecided"
        return f"median {self.median:.3g} ({counts})"


def censored_summary(values: Iterable[float]) -> Censored:
    """The `Censored` summary of `values` (±inf censored, NaN undecided)."""
    array = np.asarray(list(values), dtype=float)
    known = array[~np.isnan(array)]
    median = float(np.median(known)) if known.size else float("nan")
    censored = int(np.isinf(known).sum())
    return Censored(median, known.size - censored, censored, int(np.isnan(array).sum()))


def series(history: pd.DataFrame, metric: str, x: str = "iteration") -> pd.DataFrame:
    """The rows of `history` that have `metric`, as columns x and y sorted by x; KeyError when a history
    with rows lacks the x column (a frame made by hand without `budget`: load records through
    analysis.records, which gives every history one)."""
    if x not in history.columns and len(history):
        raise KeyError(f"the history has no {x!r} column (analysis.records.with_budget makes `budget`)")
    if metric not in history.columns or x not in history.columns:
        return pd.DataFrame({"x": [], "y": []}, dtype=float)
    rows = history[[x, metric]].dropna()
    return pd.DataFrame({"x": rows[x].astype(float), "y": rows[metric].astype(float)}).sort_values("x")


def interpolate(x: Iterable[float], y: Iterable[float], grid: Iterable[float]) -> np.ndarray:
    """`y(x)` linearly interpolated at `grid`; NaN outside [min x, max x] and where there is no data."""
    x, y, grid = (np.asarray(list(a), dtype=float) for a in (x, y, grid))
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size == 0:
        return np.full(grid.shape, np.nan)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    values = np.interp(grid, x, y)
    return np.where((grid >= x[0]) & (grid <= x[-1]), values, np.nan)


def budget_grid(histories: Iterable[pd.DataFrame], points: int = 101) -> np.ndarray:
    """`points` evenly spaced budgets from 0 to the largest budget any of `histories` reached."""
    ends = [h[BUDGET].max() for h in histories if BUDGET in h and h[BUDGET].notna().any()]
    return np.linspace(0.0, float(max(ends)) if ends else 0.0, points)


def curve(history: pd.DataFrame, metric: str, grid: np.ndarray) -> np.ndarray:
    """A run's metric on a budget grid."""
    rows = series(history, metric, x=BUDGET)
    return interpolate(rows["x"], rows["y"], grid)


def last_tenth_mean(history: pd.DataFrame, metric: str) -> float:
    """Mean of `metric` over the last 10% of the run's iterations (at least its last value)."""
    rows = series(history, metric)
    if rows.empty:
        return float("nan")
    last_iteration = float(history["iteration"].max())
    window = rows[rows["x"] > (1 - TENTH) * last_iteration]
    return float(window["y"].mean() if not window.empty else rows["y"].iloc[-1])


def initial_value(history: pd.DataFrame, metric: str) -> float:
    """The metric at iteration 0 (the SFT policy's evaluation); NaN when the run has none."""
    rows = series(history, metric)
    at_zero = rows[rows["x"] == 0]
    return float(at_zero["y"].iloc[0]) if not at_zero.empty else float("nan")


def gain(history: pd.DataFrame, metric: str) -> float:
    return last_tenth_mean(history, metric) - initial_value(history, metric)


def first_value(history: pd.DataFrame, metric: str) -> float:
    """Mean of `metric` over the first 10% of the run's iterations (at least its first value)."""
    rows = series(history, metric)
    if rows.empty:
        return float("nan")
    window = rows[rows["x"] <= TENTH * float(history["iteration"].max())]
    return float(window["y"].mean() if not window.empty else rows["y"].iloc[0])


def change(history: pd.DataFrame, metric: str) -> float:
    """Last-10% mean minus first value: the drift of a metric that has no iteration-0 row."""
    return last_tenth_mean(history, metric) - first_value(history, metric)


def samples_to_level(history: pd.DataFrame, metric: str, level: float) -> float:
    """The budget to a level: the first budget at which the metric, interpolated in budget, reaches
    `level`; +inf (censored) when it never does within the run, NaN when the run lacks the metric or the
    level is NaN."""
    rows = series(history, metric, x=BUDGET)
    if rows.empty or math.isnan(level):
        return float("nan")
    x, y = rows["x"].to_numpy(), rows["y"].to_numpy()
    reached = np.flatnonzero(y >= level)
    if reached.size == 0:
        return math.inf
    i = reached[0]
    if i == 0:
        return float(x[0])
    # the crossing on the straight segment from the last row below the level to the first at or above it
    return float(x[i - 1] + (level - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))


def samples_to_half_gain(history: pd.DataFrame, metric: str) -> float:
    """`samples_to_level` at initial + gain / 2; +inf (censored) when the gain is not positive (the run
    never rises), NaN when the run lacks the metric."""
    total = gain(history, metric)
    if math.isnan(total):
        return float("nan")
    if not total > 0:
        return math.inf
    return samples_to_level(history, metric, initial_value(history, metric) + total / 2)


def value_at(history: pd.DataFrame, metric: str, budget: float) -> float:
    """The metric interpolated at a budget; NaN outside the run's rows."""
    rows = series(history, metric, x=BUDGET)
    return float(interpolate(rows["x"], rows["y"], [budget])[0])


def at_level(history: pd.DataFrame, metric: str, level: float, other: str) -> float:
    """`other` where `metric` first reaches `level` (both interpolated in budget); NaN when it never
    does."""
    budget = samples_to_level(history, metric, level)
    return value_at(history, other, budget) if math.isfinite(budget) else float("nan")


def early_mean(history: pd.DataFrame, metric: str, fraction: float) -> float:
    """Mean of `metric` over the rows within the first `fraction` of the run's budget."""
    rows = series(history, metric, x=BUDGET)
    return float(rows.loc[rows["x"] <= fraction * float(history[BUDGET].max()), "y"].mean())


def variation(history: pd.DataFrame, metric: str) -> float:
    """Coefficient of variation of `metric` over its rows, sd (ddof=1) / mean (`scipy.stats.variation`);
    NaN for fewer than two rows."""
    values = series(history, metric)["y"].to_numpy()
    return float(st.variation(values, ddof=1)) if values.size >= 2 else float("nan")


def step_std(history: pd.DataFrame, metric: str) -> float:
    """Standard deviation (ddof=1) of the iteration-to-iteration changes of `metric`."""
    changes = np.diff(series(history, metric)["y"].to_numpy())
    return float(np.std(changes, ddof=1)) if changes.size >= 2 else float("nan")


def mean_value(history: pd.DataFrame, metric: str) -> float:
    """Mean of `metric` over every row that has it."""
    return float(series(history, metric)["y"].mean())


def max_value(history: pd.DataFrame, metric: str) -> float:
    return float(series(history, metric)["y"].max())
