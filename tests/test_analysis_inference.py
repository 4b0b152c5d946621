"""Inference across seeds (analysis.inference, and how analysis.compare uses it), checked against values
computed by hand or with scipy's distributions on fixed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from test_analysis_support import synthetic_run

from analysis.claims import REGISTRY
from analysis.compare import Effect, Finding
from analysis.inference import (
    flip_interval,
    flip_pvalue,
    holm,
    interval,
    mean_test,
    seeds_needed,
    sign_pvalue,
    sign_seeds_needed,
    skewed,
    t_pvalue,
    tost_pvalue,
)
from analysis.records import frames_from_records
from analysis.stats import Censored

# --------------------------------------------------------------------------- Holm


def test_holm_against_hand_computed_adjusted_p():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running maximum 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # capped at 1, and one p-value is left as it is
    assert holm([0.2, 0.6, 0.5, 0.01]) == pytest.approx([0.6, 1.0, 1.0, 0.04])
    assert holm([0.03]) == [0.03] and holm([]) == []


# values whose one-sample t test (n = 3, mean 2, sd 0.6) gives p = 0.0288: clear alone, not after Holm
NEAR = [1.4, 2.0, 2.6]


def test_holm_corrects_the_effects_of_one_finding():
    p = 2 * st.t.sf(2 / (0.6 / math.sqrt(3)), 2)
    assert t_pvalue(NEAR) == pytest.approx(p) and p < 0.05 < 2 * p
    alone = Effect("a", dict(enumerate(NEAR)))
    single = Finding(lambda d: d(alone), [alone], {}, 3)
    assert single.adjusted == pytest.approx([p]) and single.strict(alone) == 1
    first, second = Effect("a", dict(enumerate(NEAR))), Effect("b", dict(enumerate(NEAR)))
    pair = Finding(lambda d: d(first), [first, second], {}, 3)
    assert pair.adjusted == pytest.approx([2 * p, 2 * p])
    assert pair.strict(first) == pair.strict(second) == 0


# --------------------------------------------------------------------------- tests of one effect


def test_t_pvalue_is_the_one_sample_t_test():
    values = [0.3, -0.1, 0.8, 0.5]
    n, mean, se = 4, np.mean(values), np.std(values, ddof=1) / 2
    assert t_pvalue(values) == pytest.approx(2 * st.t.sf(mean / se, n - 1))
    assert t_pvalue(values, 1.0, "greater") == pytest.approx(st.t.sf((mean - 1) / se, n - 1))
    assert t_pvalue([0.0, 0.0, 0.0]) == 1.0 and t_pvalue([2.0]) == 1.0
    assert t_pvalue([2.0, 2.0, 2.0]) == 0.0  # no spread: the mean is known exactly


def test_tost_against_hand_computation():
    values, margin = np.array([0.10, 0.25, 0.05, 0.20, 0.15]), 0.4
    n, mean, se = 5, values.mean(), values.std(ddof=1) / math.sqrt(5)
    lower = st.t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
    upper = st.t.cdf((mean - margin) / se, n - 1)  # H0: mean >= margin
    assert tost_pvalue(values, margin) == pytest.approx(max(lower, upper))
    assert tost_pvalue(values, margin) < 0.05 < tost_pvalue(values, 0.2)
    assert tost_pvalue([0.1, 0.1, 0.1], 0.4) == 0.0 and tost_pvalue([0.5], 0.4) == 1.0


def test_sign_test_against_the_binomial():
    # non-zero, non-NaN: 1, 2, inf, -1, 3 -> 4 positive of 5; P(K >= 4) = 6 / 32, doubled
    values = [1.0, 2.0, math.inf, -1.0, 3.0, 0.0, float("nan")]
    assert sign_pvalue(values) == pytest.approx(2 * 6 / 32)
    assert sign_pvalue(values, "greater") == pytest.approx(6 / 32)
    assert sign_pvalue([-math.inf] * 6) == pytest.approx(2 / 64)
    assert sign_pvalue([0.0, float("nan")]) == 1.0


# --------------------------------------------------------------------------- power


def hand_seeds(d: float, two_sided: bool = True) -> int:
    """The smallest n whose noncentral-t power (scipy.stats.nct) reaches 0.8 for effect size d."""
    for n in range(2, 2000):
        df, nc = n - 1, d * math.sqrt(n)
        if two_sided:
            crit = st.t.ppf(0.975, df)
            power = st.nct.sf(crit, df, nc) + np.nan_to_num(st.nct.cdf(-crit, df, nc))
        else:
            power = st.nct.sf(st.t.ppf(0.95, df), df, nc)
        if power >= 0.8:
            return n
    raise AssertionError("not reached")


@pytest.mark.parametrize("d", [0.3, 0.5, 0.8, 1.2, 2.0, 4.0, 9.0])
def test_seeds_needed_against_noncentral_t(d):
    assert seeds_needed(d) == hand_seeds(d)
    assert seeds_needed(-d) == hand_seeds(d)
    assert seeds_needed(d, "larger") == hand_seeds(d, two_sided=False)


def test_seeds_needed_without_an_effect():
    assert seeds_needed(0.0) is None and seeds_needed(float("nan")) is None
    assert seeds_needed(math.inf) == 2


def hand_sign_seeds(share: float, two_sided: bool) -> int:
    """Smallest n whose exact sign test (scipy.stats.binomtest) rejects with probability >= 0.8."""
    for n in range(1, 200):
        alternative = "two-sided" if two_sided else "greater"
        rejects = [k for k in range(n + 1) if st.binomtest(k, n, 0.5, alternative=alternative).pvalue < 0.05]
        if sum(st.binom.pmf(k, n, share) for k in rejects) >= 0.8:
            return n
    raise AssertionError("not reached")


@pytest.mark.parametrize(("share", "two_sided"), [(1.0, True), (1.0, False), (0.8, True), (0.2, True)])
def test_sign_seeds_needed_against_binomtest(share, two_sided):
    needed = sign_seeds_needed(share, "two-sided" if two_sided else "greater")
    assert needed == hand_sign_seeds(share, two_sided)
    if share == 1.0:  # every seed on one side: 2 / 2^6 < 0.05 two-sided, 1 / 2^5 one-sided
        assert needed == (6 if two_sided else 5)
    assert sign_seeds_needed(0.5) is None


def test_effect_power_note_uses_the_observed_mean_and_sd():
    values = [1.0, 2.5, -0.5, 2.0]
    d = np.mean(values) / np.std(values, ddof=1)
    effect = Effect("x", dict(enumerate(values)))
    assert effect.power() == f"{hand_seeds(d)} seeds (t test, effect size {d:.2g})"
    assert Effect("x", {0: 1.0, 1: -1.0}).power() == "no effect observed"
    assert Effect("x", {0: 1.0}).power() == "no effect observed (one seed: sd undefined)"
    # censored: the sign test at the observed share, 3 of 4 seeds positive
    censored = Effect("x", {0: math.inf, 1: 5.0, 2: 3.0, 3: -1.0})
    assert censored.power() == f"{hand_sign_seeds(0.75, True)} seeds (sign test, 75% of seeds positive)"


# --------------------------------------------------------------------------- interval


SKEWED = [0.1, 0.2, 0.3, 0.2, 0.1, 0.15, 0.2, 0.1, 0.3, 3.0, 0.2, 0.1]  # 12 values, skewness 3.4


def test_sign_flip_only_for_10_to_19_skewed_values():
    assert abs(st.skew(SKEWED, bias=False)) > 1 and skewed(SKEWED)
    assert not skewed(SKEWED[:9])  # too few values: the t interval is the honest one
    assert not skewed(SKEWED * 2)  # 24 values: the t interval holds
    assert not skewed(list(np.linspace(-1.0, 1.0, 12)))
    result = interval(SKEWED)
    assert result.method == "sign-flip" and "sign-flip" in str(result)
    assert result.lo < np.mean(SKEWED) < result.hi and result.hi - result.mean > result.mean - result.lo
    assert mean_test(SKEWED)[0] == "sign-flip test" and mean_test(SKEWED[:9])[0] == "t test"


def brute_flip_pvalue(values, popmean=0.0, alternative="two-sided"):
    """Every sign pattern, one at a time: the share whose flipped sum is at least (at most, or at least
    in size) the observed sum."""
    x = [v - popmean for v in values]
    observed = sum(x)
    at_least = at_most = as_large = 0
    for pattern in range(2 ** len(x)):
        flipped = sum(-v if pattern >> i & 1 else v for i, v in enumerate(x))
        at_least += flipped >= observed - 1e-12
        at_most += flipped <= observed + 1e-12
        as_large += abs(flipped) >= abs(observed) - 1e-12
    total = 2 ** len(x)
    return {"greater": at_least / total, "less": at_most / total, "two-sided": as_large / total}[alternative]


FLIP_CASES = [
    SKEWED,
    [2.1, -0.4, 0.7, 1.3, 0.2, -0.1, 0.9, 0.05, 0.6, 4.0],
    [-1.0, 0.3, 0.2, -0.5, 0.1, 0.7, -0.2, -3.5, 0.4, 0.15, 0.35],
]


@pytest.mark.parametrize("values", FLIP_CASES)
def test_flip_pvalue_against_every_sign_pattern_and_scipy(values):
    for alternative in ("two-sided", "greater", "less"):
        assert flip_pvalue(values, alternative=alternative) == pytest.approx(
            brute_flip_pvalue(values, 0.0, alternative)
        )
    assert flip_pvalue(values, 0.3) == pytest.approx(brute_flip_pvalue(values, 0.3))
    exact = st.permutation_test(
        (np.asarray(values),), np.mean, permutation_type="samples", n_resamples=np.inf, alternative="greater"
    )
    assert flip_pvalue(values, alternative="greater") == pytest.approx(exact.pvalue)


@pytest.mark.parametrize("values", FLIP_CASES)
@pytest.mark.parametrize("confidence", [0.95, 0.90])
def test_flip_interval_inverts_the_test(values, confidence):
    """The interval holds exactly the means the test does not reject: just inside an end the
    brute-force p is at least 1 - confidence, just outside below it, and 0 is excluded exactly when
    the test of 0 rejects."""
    result = flip_interval(values, confidence)
    alpha, step = 1 - confidence, 1e-7 * (result.hi - result.lo)
    for end, inward in ((result.lo, 1), (result.hi, -1)):
        assert brute_flip_pvalue(values, end + inward * step) >= alpha
        assert brute_flip_pvalue(values, end - inward * step) < alpha
    for shift in np.linspace(result.lo - 1, result.hi + 1, 15):
        shifted = [v - shift for v in values]
        excluded = not flip_interval(shifted, confidence).lo <= 0 <= flip_interval(shifted, confidence).hi
        assert excluded == (flip_pvalue(shifted) < alpha)


def test_a_skewed_effect_decides_by_the_test_of_its_interval():
    """The adam_eps case of the last catalogue: skewed per-seed differences whose BCa interval excluded 0
    while the t test gave p = 0.29. Now the verdict's test and the printed interval agree."""
    differences = [-0.02, -0.05, 0.01, -0.03, -0.04, -0.01, 0.02, -0.06, -0.02, -0.95]
    effect = Effect("d", dict(enumerate(differences)))
    test, summary = effect.test(), effect.summary()
    assert summary.method == "sign-flip" and test.name == "sign-flip test"
    assert (test.p < 0.05) == (summary.hi < 0 or summary.lo > 0)
    finding = Finding(lambda d: d(effect), [effect], {}, 10)
    assert finding.strict(effect) == (-1 if test.p < 0.05 else 0)


def test_t_interval_by_default():
    values = [1.0, 2.5, 2.0, 4.0]
    half = st.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2
    result = interval(values)
    assert result.method == "t" and str(result).endswith("(n=4, t)")
    assert (result.lo, result.hi) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    with pytest.raises(ValueError, match="censored"):
        interval([1.0, math.inf])
    # at 90%: the 95% one-sided bounds a one-sided claim is judged by
    ninety = interval(values, 0.90)
    expected = st.t.interval(0.90, 3, loc=np.mean(values), scale=st.sem(values))
    assert (ninety.lo, ninety.hi) == pytest.approx(expected)


# --------------------------------------------------------------------------- censored values


def test_time_to_reach_is_decided_per_seed_by_its_side():
    """Seed 0: only PPO censored (RRHF faster, +inf); seed 1: both censored (undecided, NaN); seeds 2-6:
    RRHF faster by a number; seed 7: only RRHF censored. A sign test of 6 positive, 1 negative."""
    ppo = [math.inf, math.inf, 500.0, 600.0, 450.0, 700.0, 520.0, 300.0]
    rrhf = [400.0, math.inf, 200.0, 250.0, 300.0, 260.0, 410.0, math.inf]
    effect = Effect("PPO - RRHF", {s: p - r for s, (p, r) in enumerate(zip(ppo, rrhf))})
    # sorted: -inf, 110, 150, 300, 350, 440, +inf
    assert effect.censored and effect.summary() == Censored(median=300.0, measured=5, censored=2, undecided=1)
    assert effect.test() == (1, pytest.approx(2 * 8 / 128), "sign test")  # P(K >= 6 | n = 7) = 8 / 128


def rrhf_online_sweep(offline_golds: list[float]):
    """Online rises fast (speed 4) by 0.5 gold; offline linearly by the given gold per seed, its 1280
    samples generated up front (all of them at iteration 1) while its budget grows by 64 an iteration.
    The level: half way from the start to the better peak, 0.25 above the start while offline's gold
    <= 0.5."""
    records = []
    for seed, offline in enumerate(offline_golds):
        records += [
            synthetic_run(
                f"on-{seed}", seed, {"algorithm.name": "rrhf", "algorithm.mode": "online"}, speed=4
            ),
            synthetic_run(
                f"off-{seed}",
                seed,
                {"algorithm.name": "rrhf", "algorithm.mode": "offline"},
                gold=offline,
                generated=lambda it: 1280 if it else 0,
            ),
        ]
    return frames_from_records(records)


def test_censored_time_to_a_level_is_never_averaged():
    """Offline never rises in seed 2: its budget to the level is censored, so the median, not a mean
    with the budget (or over the seeds that reached), is reported, and the seed counts by its side in a
    sign test."""
    rrhf_online = REGISTRY["rrhf_online"]
    reached = rrhf_online(*rrhf_online_sweep([0.5, 0.5]))
    slow = reached.numbers["budget (samples) to the level [offline]"].mean
    # linear to 0.5: half way at half the 1280 budget, though all 1280 samples were generated at once
    assert slow == pytest.approx(640)
    verdict = rrhf_online(*rrhf_online_sweep([0.5, 0.5, -0.5]))
    budget = verdict.numbers["budget (samples) to the level [offline]"]
    assert budget == Censored(median=slow, measured=2, censored=1)
    assert str(budget) == f"median {slow:.3g} (2 measured, 1 censored)"
    assert budget.median != pytest.approx((2 * slow + 1280) / 3)  # the budget averaged in
    fast = verdict.numbers["budget (samples) to the level [online]"].mean
    effect = "budget (samples) to the level [offline] - [online]"
    assert verdict.numbers[effect] == Censored(median=slow - fast, measured=2, censored=1)
    # 3 of 3 seeds positive: the two-sided sign test's p is 2 / 8, doubled by Holm (the seconds' part is
    # censored alike), where the reached seeds alone were clear
    assert reached.verdict == "supported"
    assert verdict.numbers[f"{effect}: p (sign test, Holm-adjusted)"] == pytest.approx(2 * 2 / 8)
    assert verdict.verdict == "inconclusive"
    assert f"{effect}: {hand_sign_seeds(1.0, True)} seeds (sign test, 100% of seeds positive)" in verdict.note


def test_every_seed_censored_is_clearly_slower():
    verdict = REGISTRY["rrhf_online"](*rrhf_online_sweep([-0.5] * 7))
    assert verdict.numbers["budget (samples) to the level [offline]"] == Censored(math.inf, 0, 7)
    # 7 of 7 online faster: sign test p = 2 / 128 for budget and for seconds, Holm: 2 x 2 / 128 < 0.05
    effect = "budget (samples) to the level [offline] - [online]"
    assert verdict.numbers[f"{effect}: p (sign test, Holm-adjusted)"] == pytest.approx(4 / 128)
    assert verdict.verdict == "supported"


def three_algorithm_sweep(rrhf_gains: list[float]):
    records = []
    for seed, rrhf_gain in enumerate(rrhf_gains):
        records += [
            synthetic_run(f"gae-{seed}", seed, {"algorithm.name": "ppo_gae"}, gold=0.4),
            synthetic_run(f"sampled-{seed}", seed, {"algorithm.name": "ppo_sampled"}, gain=1.1, gold=0.3),
            synthetic_run(f"rrhf-{seed}", seed, {"algorithm.name": "rrhf"}, gain=rrhf_gain, gold=-0.2),
        ]
    return frames_from_records(records)


def test_three_algorithms_equivalence_is_a_tost_on_log_ratios():
    rrhf = [1.05, 1.2, 0.95, 1.25]
    verdict = REGISTRY["three_algorithms"](*three_algorithm_sweep(rrhf))
    ratios = [math.log(max(1.0, 1.1, g) / min(1.0, 1.1, g)) for g in rrhf]
    name = "log(largest / smallest proxy gain)"
    assert verdict.numbers[name].mean == pytest.approx(np.mean(ratios))
    assert verdict.numbers[f"{name}: p (TOST inside the margin)"] == pytest.approx(
        tost_pvalue(ratios, math.log(1.5))
    )
    assert verdict.verdict == "supported"
    keys = list(verdict.numbers)
    assert keys[:3] == ["gold gain [ppo_gae]", "gold gain [ppo_sampled]", "gold gain [rrhf]"]
    assert verdict.numbers["gold gain [rrhf]"].mean == pytest.approx(-0.2)


def test_three_algorithms_non_positive_gain_is_censored_above_the_margin():
    verdict = REGISTRY["three_algorithms"](*three_algorithm_sweep([1.05, 1.2, -0.3]))
    name = "log(largest / smallest proxy gain)"
    assert verdict.numbers[name] == Censored(median=math.log(1.2), measured=2, censored=1)
    assert verdict.verdict == "inconclusive"  # never supported with a censored seed
    assert "1 of 3 seeds have a non-positive proxy gain" in verdict.note
    # every seed censored: 6 of 6 beyond the margin, one-sided sign test p = 1 / 64
    all_censored = REGISTRY["three_algorithms"](*three_algorithm_sweep([-0.3] * 6))
    assert all_censored.numbers[f"{name}: p (sign test beyond the margin)"] == pytest.approx(1 / 64)
    assert all_censored.verdict == "contradicted"
