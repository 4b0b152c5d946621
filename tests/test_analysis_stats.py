"""Per-run measures and across-seed aggregation, checked against direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from analysis.stats import (
    Censored,
    at_level,
    band,
    budget_grid,
    censored_summary,
    change,
    curve,
    early_mean,
    first_value,
    gain,
    initial_value,
    interpolate,
    last_tenth_mean,
    mean_ci,
    samples_to_half_gain,
    samples_to_level,
    step_std,
    value_at,
    variation,
)


def history(values, metric="m", every=1, samples_per_iteration=10, up_front=False):
    """Rows for iterations 0..len(values)-1 with `metric` on every `every`-th row, `budget` =
    iteration x samples_per_iteration; `samples` the same, or with `up_front` (an offline buffer) the
    whole budget from iteration 1 on."""
    total = (len(values) - 1) * samples_per_iteration
    rows = [
        {
            "iteration": i,
            "budget": i * samples_per_iteration,
            "samples": (total if i else 0) if up_front else i * samples_per_iteration,
            **({metric: v} if i % every == 0 else {}),
        }
        for i, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_mean_ci_matches_student_t():
    values = [1.0, 2.5, 2.0, 4.0]
    ci = mean_ci(values)
    n, sd = len(values), np.std(values, ddof=1)
    assert ci.mean == pytest.approx(np.mean(values))
    assert ci.half == pytest.approx(st.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    assert (ci.lo, ci.hi, ci.n) == (pytest.approx(ci.mean - ci.half), pytest.approx(ci.mean + ci.half), 4)


def test_mean_ci_one_value_has_no_interval_and_nan_is_left_out():
    one = mean_ci([2.0, float("nan")])
    assert one.mean == 2.0 and one.n == 1 and math.isnan(one.half)
    assert str(one) == "2 (n=1)"
    assert mean_ci([]).n == 0 and str(mean_ci([])) == "n/a"


def test_mean_ci_of_equal_values_has_no_spread_exactly():
    ci = mean_ci([1 / 9] * 5)  # a float sum of these divided by 5 is not exactly 1/9
    assert (ci.mean, ci.half) == (1 / 9, 0.0)
    assert str(ci) == "0.111 ± 0 (n=5)"
    mean, half, _ = band(np.array([[0.1, 1.0], [0.1, np.nan], [0.1, 3.0]]))
    assert (mean[0], half[0]) == (0.1, 0.0) and half[1] > 0


def test_band_is_columnwise_mean_ci():
    matrix = np.array([[1.0, 2.0, np.nan], [3.0, 2.0, 5.0], [2.0, 5.0, np.nan]])
    mean, half, n = band(matrix)
    for column in range(3):
        expected = mean_ci(matrix[:, column])
        assert mean[column] == pytest.approx(expected.mean)
        assert n[column] == expected.n
        assert (math.isnan(half[column]) and math.isnan(expected.half)) or half[column] == pytest.approx(
            expected.half
        )


def test_interpolate_inside_range_only():
    grid = np.array([-5.0, 0.0, 5.0, 10.0, 15.0, 25.0])
    out = interpolate([0, 10, 20], [0.0, 1.0, float("nan")], grid)
    # the NaN point is dropped, so the run's range ends at 10
    np.testing.assert_allclose(out, [np.nan, 0.0, 0.5, 1.0, np.nan, np.nan])
    assert np.isnan(interpolate([], [], [1.0])).all()


def test_curve_on_budget_grid():
    rows = history([0.0, 1.0, 2.0, 3.0, 4.0], every=2)  # metric at budget 0, 20, 40
    grid = budget_grid([rows, history([0.0] * 10)], points=10)
    assert grid[0] == 0 and grid[-1] == 90
    values = curve(rows, "m", grid)
    np.testing.assert_allclose(values[:5], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert np.isnan(values[5:]).all()


def test_an_offline_buffer_is_read_on_its_budget_not_its_samples():
    """Samples generated up front (all 40 at iteration 1) while the budget grows by 10 an iteration: the
    curve, the budget to a level, values at a budget and early means follow the budget, exactly as for
    the same run generating as it goes."""
    values, kl = [1.0, 1.0, 2.0, 5.0, 5.0], [0.0, 1.0, 2.0, 4.0, 8.0]
    offline = history(values, up_front=True).assign(kl=kl)
    online = history(values).assign(kl=kl)
    assert offline["samples"].tolist() == [0, 40, 40, 40, 40]
    grid = budget_grid([offline])
    assert grid[-1] == 40
    np.testing.assert_allclose(curve(offline, "m", grid), curve(online, "m", grid))
    assert samples_to_level(offline, "m", 4.0) == pytest.approx(20 + 20 / 3)  # on samples: 40
    assert samples_to_half_gain(offline, "m") == pytest.approx(20 + 10 / 3)
    assert value_at(offline, "kl", 25.0) == pytest.approx(3.0)
    assert at_level(offline, "m", 4.0, "kl") == pytest.approx(2 + 2 * 2 / 3)
    assert early_mean(offline, "m", 0.25) == pytest.approx(1.0)  # iterations 0 and 1 (budget <= 10)


def test_a_history_without_a_budget_is_refused_not_read_as_empty():
    """A frame made by hand without `budget` (the loader gives every history one) raises, rather than
    reading every budget measure as NaN."""
    rows = history([1.0, 2.0]).drop(columns="budget")
    with pytest.raises(KeyError, match="budget"):
        samples_to_level(rows, "m", 1.5)
    assert last_tenth_mean(rows, "m") == 2.0  # measures over iterations need no budget


def test_last_tenth_mean_is_the_mean_of_the_last_tenth():
    values = list(range(21))  # iterations 0..20: last 10% = iterations 19, 20
    assert last_tenth_mean(history(values), "m") == pytest.approx(19.5)
    # eval every 5 iterations: no eval in iterations 19-20 except 20
    assert last_tenth_mean(history(values, every=5), "m") == 20
    # eval every 3 (0, 3, ..., 18): none in the last 10%, so the last eval
    assert last_tenth_mean(history(values, every=3), "m") == 18
    assert math.isnan(last_tenth_mean(history(values), "other"))


def test_gain_and_half_gain():
    rows = history([1.0, 1.0, 2.0, 5.0, 5.0])  # budget 0..40
    assert initial_value(rows, "m") == 1.0
    assert gain(rows, "m") == pytest.approx(4.0)  # last 10% of 4 iterations: iteration 4 only
    # target 3: crossed between budget 20 (2.0) and 30 (5.0), a third of the way
    assert samples_to_half_gain(rows, "m") == pytest.approx(20 + 10 / 3)
    # a run that never rises never reaches its half gain: censored (+inf), not a budget
    assert samples_to_half_gain(history([1.0, 0.5, 0.0]), "m") == math.inf
    assert math.isnan(samples_to_half_gain(history([1.0, 0.5, 0.0]), "other"))


def test_levels_and_values_read_on_the_budget_axis():
    rows = history([1.0, 1.0, 2.0, 5.0, 5.0]).assign(kl=[0.0, 1.0, 2.0, 4.0, 8.0])  # budget 0..40
    # level 4: between budget 20 (2.0) and 30 (5.0), two thirds of the way
    assert samples_to_level(rows, "m", 4.0) == pytest.approx(20 + 20 / 3)
    assert samples_to_level(rows, "m", 0.5) == 0.0  # reached at the start
    assert samples_to_level(rows, "m", 6.0) == math.inf  # never: censored
    assert math.isnan(samples_to_level(rows, "m", math.nan)) and math.isnan(samples_to_level(rows, "x", 1))
    assert value_at(rows, "kl", 25.0) == pytest.approx(3.0) and math.isnan(value_at(rows, "kl", 50.0))
    # the KL where m first reaches 4: at budget 26.67, two thirds from 2 to 4
    assert at_level(rows, "m", 4.0, "kl") == pytest.approx(2 + 2 * 2 / 3)
    assert math.isnan(at_level(rows, "m", 6.0, "kl"))


def test_first_value_change_and_early_mean():
    values = list(range(21))  # iterations 0..20: first 10% = iterations 0, 1, 2; last = 19, 20
    assert first_value(history(values), "m") == pytest.approx(1.0)
    assert change(history(values), "m") == pytest.approx(19.5 - 1.0)
    # a training metric without an iteration-0 row, every 5 iterations from 5: the first one
    training = history(values).assign(m=[np.nan if i % 5 or i == 0 else float(i) for i in values])
    assert first_value(training, "m") == 5.0
    # budget 0..200: the first 25% is budget <= 50, iterations 0..5
    assert early_mean(history(values), "m", 0.25) == pytest.approx(2.5)


def test_variation_is_scipys_coefficient_of_variation():
    values = [1.0, 1.5, 0.5, 1.2, 0.8]
    assert variation(history(values), "m") == pytest.approx(np.std(values, ddof=1) / np.mean(values))
    assert variation(history(values), "m") == pytest.approx(st.variation(values, ddof=1))
    # scale-free: rescaling the series (as whitening rescales the advantages) leaves it unchanged
    assert variation(history([4 * v for v in values]), "m") == pytest.approx(variation(history(values), "m"))
    assert math.isnan(variation(history([1.0]), "m"))


def test_censored_values_are_never_averaged():
    with pytest.raises(ValueError, match="censored"):
        mean_ci([300.0, 200.0, math.inf])


def test_censored_summary_ranks_censored_values_last():
    # the median of 200, 300 and a value never reached is 300, whatever the budget was
    assert censored_summary([300.0, math.inf, 200.0]) == Censored(300.0, 2, 1)
    # half or more censored: the median is censored too
    assert censored_summary([100.0, math.inf]).median == math.inf
    assert censored_summary([100.0, math.inf, math.inf]) == Censored(math.inf, 1, 2)
    # NaN: a seed without a value, counted apart
    summary = censored_summary([-math.inf, 5.0, 7.0, float("nan")])
    assert summary == Censored(5.0, 2, 1, 1)
    assert str(summary) == "median 5 (2 measured, 1 censored, 1 undecided)"


def test_step_std_of_changes():
    values = [0.0, 1.0, 0.0, 2.0, 1.0]
    assert step_std(history(values), "m") == pytest.approx(np.std(np.diff(values), ddof=1))
    # a straight line has no roughness, whatever its slope
    assert step_std(history([0.0, 3.0, 6.0, 9.0]), "m") == pytest.approx(0.0)
    assert math.isnan(step_std(history([1.0, 2.0]), "m"))
