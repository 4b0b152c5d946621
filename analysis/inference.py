"""Inference across seeds: intervals, tests, multiplicity and power for per-seed values.

Every function takes the per-seed values of one quantity (a paired effect, or one arm's measure) and
wraps a maintained implementation; each docstring names the exact test. Conventions:

- NaN is "no value for this seed" and is left out; ±inf is a censored value (its side is known, its
  size is not: a level never reached within the budget) and is never averaged: `interval` refuses it,
  and `sign_pvalue` is the test for values that contain it.
- Tests, each at `ALPHA` = 0.05: of a mean, the one-sample t test or the sign-flip test as below
  (`mean_test`), the exact sign test for values
  with censored ones (`sign_pvalue`), TOST for an equivalence within a margin (`tost_pvalue`); the
  p-values of one row's effects are Holm-corrected together (`holm`).
- Interval and test of a mean go together: Student t by default (the t interval excludes 0 exactly
  when the t test rejects); for 10 to 19 values with |adjusted sample skewness| > `SKEW`
  (`skewed`), the exact sign-flip randomization test (`flip_pvalue`, every one of the 2^n sign
  patterns) and its inversion, the interval of Hartigan (1969) from the ordered means of the 2^n - 1
  non-empty subsets of the values (`flip_interval`), which excludes 0 exactly when the test rejects.
  For a paired effect the sign-flip test is exact under the null that the knob does nothing (the arms
  of a seed are then exchangeable, so the difference is symmetric about 0), whatever the skew. A BCa
  bootstrap, used before, under-covers at 10 seeds: its interval could exclude 0 while the t test
  gave p = 0.29, and the verdict read as inconsistent. Below 10 values the sign-flip test has too
  few patterns to reach 0.05 with room to spare (the t interval is the honest one), and from 20
  values the t interval's normal approximation holds.
- Power: the seeds a one-sample t test at `ALPHA` needs for `POWER` = 0.8 at the observed standardised
  effect |mean| / sd (statsmodels TTestPower), or, for censored values, the exact sign test's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as st
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import DescrStatsW

from analysis.stats import mean_ci

ALPHA = 0.05
POWER = 0.8
CONFIDENCE = 0.95
FLIP_SEEDS = range(10, 20)
SKEW = 1.0
MAX_SEEDS = 1000  # power searches stop here
SCAN_SEEDS = np.arange(2, 51)  # power is read off directly for up to 50 seeds, solved beyond


def _finite(values: Iterable[float]) -> np.ndarray:
    """The values without NaN; ValueError on a censored (infinite) value, which must not be averaged."""
    array = np.asarray(list(values), dtype=float)
    array = array[~np.isnan(array)]
    if np.isinf(array).any():
        raise ValueError("censored (infinite) values have no mean: use a sign test or a censored summary")
    return array


@dataclass(frozen=True)
class Interval:
    """A mean across seeds with its 95% interval and the method that gave it ("t" or "sign-flip")."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if math.isnan(self.lo):
            return f"{self.mean:.3g} (n={self.n})"
        if self.method == "t":
            return f"{self.mean:.3g} ± {(self.hi - self.lo) / 2:.2g} (n={self.n}, t)"
        return f"{self.mean:.3g} [{self.lo:.3g}, {self.hi:.3g}] (n={self.n}, {self.method})"


def skewed(values: Iterable[float]) -> bool:
    """True when a mean is judged by the sign-flip test: 10 <= n < 20 finite values and |skewness| > 1,
    the skewness being scipy's bias-adjusted sample skewness (G1, `scipy.stats.skew(bias=False)`)."""
    array = _finite(values)
    if array.size not in FLIP_SEEDS or np.ptp(array) == 0:
        return False
    return abs(float(st.skew(array, bias=False))) > SKEW


def _subset_sums(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums and sizes of all 2^n subsets of `array` (the empty one first), built by doubling."""
    sums, sizes = np.zeros(1), np.zeros(1, dtype=int)
    for value in array:
        sums, sizes = np.concatenate([sums, sums + value]), np.concatenate([sizes, sizes + 1])
    return sums, sizes


def flip_pvalue(values: Iterable[float], popmean: float = 0.0, alternative: str = "two-sided") -> float:
    """p of the exact sign-flip test of "the values are symmetric about `popmean`" by their sum: flipping
    the signs of the subset A of x = values - popmean moves the sum to sum(x) - 2 sum_A(x), so the flips
    with a sum at least the observed one are the subsets with sum_A(x) <= 0 (the empty one included);
    "greater" p is their share of the 2^n, "less" the mirror, two-sided twice the smaller (the null is
    symmetric), capped at 1. The same p as `scipy.stats.permutation_test` with one sample and
    `permutation_type="samples"`, exact, without its resampling loop."""
    x = _finite(values) - popmean
    sums, _ = _subset_sums(x)
    tol = 1e-12 * max(1.0, float(np.abs(x).sum()))  # a subset summing to 0 in exact arithmetic
    greater = float(np.mean(sums <= tol))
    less = float(np.mean(sums >= -tol))
    return {"greater": greater, "less": less, "two-sided": min(1.0, 2 * min(greater, less))}[alternative]


def flip_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of the mean that inverts `flip_pvalue` (Hartigan 1969): with M_(1) <= ... <= M_(N)
    the means of the N = 2^n - 1 non-empty subsets and k = floor((1 - confidence) / 2 * 2^n), the
    interval [M_(k), M_(N + 1 - k)] covers the centre of symmetry with probability 1 - 2k / 2^n >=
    `confidence`, and excludes a value m exactly when the test of m rejects at 1 - confidence."""
    array = _finite(values)
    sums, sizes = _subset_sums(array)
    means = np.sort(sums[1:] / sizes[1:])
    k = math.floor((1 - confidence) / 2 * 2**array.size)
    if k < 1:  # too few values to reach the confidence
        return Interval(float(array.mean()), -math.inf, math.inf, array.size, "sign-flip")
    return Interval(float(array.mean()), float(means[k - 1]), float(means[-k]), array.size, "sign-flip")


def interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and 95% interval (or at `confidence`: 90% gives the 95% one-sided bounds) of the non-NaN
    `values`: `flip_interval` when `skewed`, else Student t, mean ± t.ppf((1 + confidence) / 2, n-1) *
    sd / sqrt(n). One value has no interval (lo = hi = NaN)."""
    array = _finite(values)
    if skewed(array):
        return flip_interval(array, confidence)
    ci = mean_ci(array, confidence)
    return Interval(ci.mean, ci.lo, ci.hi, ci.n, "t")


def mean_test(values: Iterable[float]) -> tuple[str, Callable[..., float]]:
    """The test of a mean that goes with `interval`, by name: the sign-flip test when `skewed`, else
    the t test (each called as `test(values, popmean=0, alternative="two-sided")`)."""
    return ("sign-flip test", flip_pvalue) if skewed(values) else ("t test", t_pvalue)


def t_pvalue(values: Iterable[float], popmean: float = 0.0, alternative: str = "two-sided") -> float:
    """p of the one-sample t test of mean == `popmean` against `alternative` ("two-sided", "greater",
    "less"; `scipy.stats.ttest_1samp`); 1 for fewer than two values. Values without spread fix the
    mean exactly: p = 0 when it lies on the alternative's side of `popmean`, else 1."""
    array = _finite(values)
    if array.size < 2:
        return 1.0
    if np.ptp(array) == 0:
        shift = array[0] - popmean
        on_side = {"two-sided": shift != 0, "greater": shift > 0, "less": shift < 0}[alternative]
        return 0.0 if on_side else 1.0
    return float(st.ttest_1samp(array, popmean, alternative=alternative).pvalue)


def sign_pvalue(values: Iterable[float], alternative: str = "two-sided") -> float:
    """p of the exact sign test of "positive and negative values are equally likely": the number of
    positive values among the non-zero, non-NaN ones against Binomial(n, 1/2) (`scipy.stats.binomtest`).
    Censored values (±inf) count by their side; 1 when no value is non-zero."""
    array = np.asarray(list(values), dtype=float)
    array = array[~np.isnan(array) & (array != 0)]
    if array.size == 0:
        return 1.0
    return float(st.binomtest(int((array > 0).sum()), array.size, 0.5, alternative=alternative).pvalue)


def tost_pvalue(values: Iterable[float], margin: float) -> float:
    """p of the two one-sided t tests (TOST) that the mean lies inside (-margin, margin): the larger
    of the two one-sided p-values (`statsmodels DescrStatsW.ttost_mean`); 1 for fewer than two values.
    Equivalence is shown at level ALPHA when p < ALPHA, i.e. the 90% t interval is inside the margin."""
    array = _finite(values)
    if array.size < 2:
        return 1.0
    if np.ptp(array) == 0:  # no spread: the mean is known exactly
        return 0.0 if abs(array[0]) < margin else 1.0
    return float(DescrStatsW(array).ttost_mean(-margin, margin)[0])


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (`statsmodels multipletests(method="holm")`): the i-th
    smallest p times (m - i + 1), made non-decreasing and capped at 1."""
    if not pvalues:
        return []
    return [float(p) for p in multipletests(list(pvalues), method="holm")[1]]


def seeds_needed(effect_size: float, alternative: str = "two-sided") -> int | None:
    """The smallest number of seeds at which a one-sample t test at ALPHA has 80% power against the
    standardised effect |mean| / sd (statsmodels TTestPower); None when there is no effect (0 or NaN)
    or more than MAX_SEEDS are needed. Two-sided power is counted by its near tail (the one-sided power
    at ALPHA / 2): the far tail, below ALPHA / 2 and vanishing at 80% power, changes no answer, and
    scipy's noncentral t returns NaN for it at large effects. Up to 50 seeds the power is read off for
    every n, beyond that solved for (`TTestPower.solve_power`, rounded up)."""
    size = abs(effect_size)
    if not size > 0:
        return None
    if math.isinf(size):
        return int(SCAN_SEEDS[0])
    alpha = ALPHA / 2 if alternative == "two-sided" else ALPHA
    power = np.nan_to_num(TTestPower().power(size, nobs=SCAN_SEEDS, alpha=alpha, alternative="larger"))
    enough = np.flatnonzero(power >= POWER)
    if enough.size:
        return int(SCAN_SEEDS[enough[0]])
    nobs = TTestPower().solve_power(effect_size=size, alpha=alpha, power=POWER, alternative="larger")
    return math.ceil(nobs) if math.isfinite(nobs) and nobs <= MAX_SEEDS else None


def sign_seeds_needed(share: float, alternative: str = "two-sided") -> int | None:
    """The smallest number of decided seeds at which the exact sign test at ALPHA (`sign_pvalue`)
    rejects with probability >= 80% when each seed is positive with probability `share` (the observed
    share); None when there is no effect (share 1/2, or for "greater" share <= 1/2) or more than
    MAX_SEEDS are needed. The power is the Binomial(n, share) probability of the counts whose sign-test
    p is below ALPHA."""
    if math.isnan(share) or share == 0.5 or (alternative == "greater" and share < 0.5):
        return None
    for n in range(1, MAX_SEEDS + 1):
        counts = np.arange(n + 1)
        above = st.binom.sf(counts - 1, n, 0.5)  # P(K >= k) under the null
        if alternative == "greater":
            p = above
        else:  # Binomial(n, 1/2) is symmetric: two-sided p = twice the smaller tail
            p = np.minimum(1.0, 2 * np.minimum(st.binom.cdf(counts, n, 0.5), above))
        if st.binom.pmf(counts[p < ALPHA], n, share).sum() >= POWER:
            return n
    return None
