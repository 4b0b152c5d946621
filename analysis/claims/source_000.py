"""Source 000: a practitioner's comparison of trlx, DeepSpeed-Chat and ColossalAI-Chat, three algorithms
on Accelerate + DeepSpeed + PEFT (quotes translated). Its rows, in the catalogue's order.

Each rule is applied per seed at equal budget and combined across seeds as analysis.compare states
(Holm across a row's effects; censored values by their side only); "clearly" below means that.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import partial

import numpy as np
import pandas as pd

from analysis.arms import of_phase
from analysis.claims.metrics import (
    ADVANTAGE_STD,
    ELAPSED,
    EXPLAINED_VARIANCE,
    GOLD,
    GRAD_NORM,
    KL,
    REWARD,
    beside,
    gold_first,
    sweep_arms,
)
from analysis.claims.registry import claim
from analysis.compare import (
    Direction,
    Effect,
    Finding,
    Group,
    Study,
    Verdict,
    all_of,
    any_of,
    common_level,
    difference,
    extreme_values,
    finding,
    gain_of,
    half_gain_of,
    judge,
    last_tenth_of,
    lead,
    means,
    no_worse,
    seed_effect,
    summary,
    two_values,
)
from analysis.records import swept_knobs
from analysis.stats import at_level, early_mean, mean_value, samples_to_level, value_at, variation

# "early" and "a bit faster": a quarter of the budget
EARLY = 0.25


def _arms(group: Group, runs: pd.DataFrame) -> list | None:
    """The algorithms compared: the sweep's recorded arms, or those present; None when a recorded arm
    has no runs in the group, or fewer than two algorithms are there."""
    arms = sweep_arms(runs) or group.values()
    return arms if len(arms) >= 2 and set(arms) <= set(group.cells) else None


# --------------------------------------------------------------------------- three_algorithms

EQUIVALENCE_RATIO = 1.5


def log_gain_ratio(gains: Iterable[float]) -> float:
    """log(largest / smallest gain); +inf (censored above any margin) when a gain is not positive."""
    values = list(gains)
    if any(math.isnan(v) for v in values):
        return float("nan")
    return math.log(max(values) / min(values)) if min(values) > 0 else math.inf


@claim(
    "three_algorithms",
    source="000",
    text="\"for trlx's multi-step PPO, ColossalAI's single-step PPO and RRHF, the amount the reward rose "
    'was about the same"',
    limits=(
        "A 4-layer word-level model on a synthetic review grammar, a reward model learned from 2000 noisy "
        "pairs, one budget (3840 samples) and a 6-cell grid per algorithm on two tuning seeds. The gain "
        "ratio can move with scale (RRHF ranks its own samples, which are less diverse from a small "
        "policy) and with the budget; the source's comparison was on 7B models with human preference "
        "data."
    ),
)
def three_algorithms(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (an equivalence, margin log 1.5; the claim is about the reward model's score, so the proxy
    decides, and gold is reported first): per seed, the log ratio of the largest to the smallest of the
    arms' gains of eval/reward_mean. Supported when the TOST rejects at 0.05 (the ratio is >= 1, so only
    the upper bound binds); contradicted when the one-sided t test puts the mean log ratio above log 1.5
    at 0.05; else inconclusive. A seed with a non-positive gain has an infinite ratio: censored above the
    margin and counted, not averaged; with one, only the one-sided sign test of "above the margin" can
    decide (contradicted), never supported. The arms are the sweep's (tuning.json), else the algorithms
    present (at least two); every one needs runs. The gold-KL frontier is the report's own table."""

    def rule(g: Group) -> Finding | None:
        arms = _arms(g, runs)
        if arms is None:
            return None
        proxy, seeds = g.paired(arms, gain_of(REWARD))
        gold, _ = g.paired(arms, gain_of(GOLD)) if g.has_metric(GOLD) else ({}, [])
        ratio = Effect(
            "log(largest / smallest proxy gain)",
            {s: log_gain_ratio(proxy[a][s] for a in arms) for s in seeds},
            margin=math.log(EQUIVALENCE_RATIO),
        )
        numbers = {
            **means("gold gain", gold, seeds),
            **means("proxy gain", proxy, seeds),
            "margin: log 1.5": math.log(EQUIVALENCE_RATIO),
        }
        censored = sum(math.isinf(v) for v in ratio.per_seed.values())
        note = (
            f"{censored} of {len(seeds)} seeds have a non-positive proxy gain: their ratio is censored "
            "above the margin (sign test)"
            if censored
            else ""
        )
        return finding([ratio], numbers, len(seeds), note=note)

    groups = Study(runs, history).groups(["algorithm.name"])
    return judge(groups, rule, "ok evaluation runs of every arm of the sweep (at least two algorithms)")


# --------------------------------------------------------------------------- rrhf_fast_but_far


@claim(
    "rrhf_fast_but_far",
    source="000",
    text='"RRHF rises a bit faster, but its KL drifts much further than PPO\'s"',
    limits=(
        "Speed is read at 25% of the budget and KL at the highest proxy level every arm reaches; when one "
        "arm rises little, that common level is low and the KL comparison covers a narrow range. The "
        "source saw the drift on 7B models with long responses."
    ),
)
def rrhf_fast_but_far(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (RRHF against every other arm of the sweep: the PPOs), per seed. Faster: RRHF's absolute
    proxy (eval/reward_mean, interpolated in budget) at 25% of the budget minus the highest other
    arm's. Further: at the highest proxy every arm reaches (the smallest of the arms' peaks), RRHF's KL
    (eval/kl_mean where its proxy first gets there) minus the largest other arm's. Supported when both
    are clearly positive, contradicted when either is clearly negative. Gold at 25% of the budget is
    reported beside."""

    def rule(g: Group) -> Finding | None:
        arms = _arms(g, runs)
        if arms is None or "rrhf" not in arms:
            return None
        at_early = EARLY * g.budget
        early, seeds = g.paired(arms, partial(value_at, metric=REWARD, budget=at_early))
        level = common_level(g, arms, REWARD, share=1.0, of=min)
        kl, _ = g.paired(arms, lambda h, lv: at_level(h, REWARD, lv, KL), level)
        fast = lead("proxy at 25% of the budget", early, seeds, "rrhf")
        far = lead("KL at the proxy every arm reaches", kl, seeds, "rrhf")
        numbers = {
            f"25% of the budget ({g.unit})": at_early,
            **means("proxy at 25% of the budget", early, seeds),
            "proxy every arm reaches": summary(level[s] for s in seeds),
            **means("KL at the proxy every arm reaches", kl, seeds),
        }
        if g.has_metric(GOLD):
            gold, _ = g.paired(arms, partial(value_at, metric=GOLD, budget=at_early))
            numbers.update(means("gold at 25% of the budget", gold, seeds))
        return finding([fast, far], numbers, len(seeds))

    groups = Study(runs, history).groups(["algorithm.name"])
    return judge(groups, rule, "ok evaluation runs of RRHF and every other arm of the sweep")


# --------------------------------------------------------------------------- tuning_sensitivity

GOOD_SHARE = 0.8
CELL = "grid_cell"  # no dot: a derived label, never taken for a config knob


def grid_cells(runs: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Each run's cell of its algorithm's grid (`lr=0.0001, cliprange=0.1`: the knobs swept within that
    algorithm's runs) and every knob that makes a cell."""
    labels = pd.Series("", index=runs.index, dtype=object)
    axes: set[str] = set()
    for _, rows in runs.groupby("algorithm.name"):
        knobs = swept_knobs(rows, exclude=["algorithm.name"])
        axes.update(knobs)
        for index, row in rows.iterrows():
            labels[index] = ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in knobs)
    return labels, sorted(axes)


def good_share(gains: Iterable[float], fraction: float = GOOD_SHARE) -> float:
    """The share of grid cells whose gain is at least `fraction` of the best cell's; NaN when a cell has
    no value or the best gain is not positive (nothing to be near)."""
    values = np.asarray(list(gains), dtype=float)
    if np.isnan(values).any() or not values.max() > 0:
        return float("nan")
    return float((values >= fraction * values.max()).mean())


@claim(
    "tuning_sensitivity",
    source="000",
    text='"RRHF needs almost no tuning; PPO needs fairly careful tuning"',
    limits=(
        "The share of cells within 80% of the best depends on the grid's span (learning rate x 0.3 to 3); "
        "a wider span, or a larger model whose stable learning rates are narrower, can reorder the "
        "algorithms."
    ),
)
def tuning_sensitivity(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (each algorithm's grid of lr x its main knob: a tuned sweep's tuning runs, or the runs of a
    plain sweep): per algorithm and seed, the share of its grid cells whose gold gain (proxy without
    gold) is >= 80% of its best cell's on that seed (NaN when that best is not positive). Effect: RRHF's
    share minus the highest other algorithm's. Supported when clearly positive, contradicted when
    clearly negative. Needs RRHF and another algorithm with at least two cells each."""
    phase = "tune" if len(of_phase(runs, "tune")) else "evaluate"
    grid, axes = of_phase(runs, phase), []
    if "algorithm.name" in grid.columns:
        labels, axes = grid_cells(grid)
        grid = grid.assign(**{CELL: labels})

    def rule(g: Group) -> Finding | None:
        cells = defaultdict(list)
        for algorithm, cell in g.cells:
            cells[algorithm].append((algorithm, cell))
        algorithms = [a for a in sorted(cells) if len(cells[a]) >= 2]
        if "rrhf" not in algorithms or len(algorithms) < 2:
            return None
        metric = gold_first(g)
        gains, seeds = g.paired([c for a in algorithms for c in cells[a]], gain_of(metric))
        share = {a: {s: good_share(gains[c][s] for c in cells[a]) for s in seeds} for a in algorithms}
        effect = lead("share of cells within 80% of the best", share, seeds, "rrhf")
        numbers = {
            **means(f"share of cells within 80% of the best {metric} gain", share, seeds),
            **{f"grid cells [{a}]": len(cells[a]) for a in algorithms},
            "runs": f"the {phase} phase",
        }
        return finding([effect], numbers, len(seeds))

    groups = Study(grid, history, phase).groups(["algorithm.name", CELL], exclude=axes)
    return judge(groups, rule, "ok runs of the grids of RRHF and another algorithm (>= 2 cells each)")


# --------------------------------------------------------------------------- gae_defaults

GAE_DEFAULT = (1.0, 0.95)


@claim(
    "gae_defaults",
    source="000",
    text="\"trlx's defaults are basically fine, especially gamma and lambda; change them and results can "
    'get much worse"',
    limits=(
        "Responses of up to 48 tokens with one terminal reward and a per-token KL penalty; longer "
        "horizons or denser rewards change how much gamma and lambda matter."
    ),
)
def gae_defaults(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ppo_gae, settings = (algorithm.gamma, algorithm.lam), default (1, 0.95)): per seed, last-10%
    mean of gold (proxy without gold) per setting; effects: default minus each other setting (Holm across
    them). The best setting is the one with the highest mean. Supported when the default is not clearly below
    the best and at least one setting is clearly below the default; contradicted when the default is
    clearly below the best; inconclusive otherwise."""

    def rule(g: Group) -> Finding | None:
        if GAE_DEFAULT not in g.cells:
            return None
        metric = gold_first(g)
        per_value, seeds = g.paired(g.values(), last_tenth_of(metric))
        label = f"last-10% {metric} (gamma, lam)"
        numbers = means(label, per_value, seeds)
        best = max(per_value, key=lambda v: numbers[f"{label} [{v}]"].mean)
        versus = {
            v: seed_effect(f"default - {v}", per_value, seeds, lambda m, v=v: m[GAE_DEFAULT] - m[v])
            for v in per_value
            if v != GAE_DEFAULT
        }

        def decide(direction: Direction) -> int:
            near_best = no_worse(direction(versus[best])) if best in versus else 1
            return all_of(near_best, any_of(*map(direction, versus.values())))

        found = finding(list(versus.values()), numbers, len(seeds), decide)
        return beside(found, g, g.values(), metric)

    groups = Study(runs, history).groups(["algorithm.gamma", "algorithm.lam"], {"algorithm.name": "ppo_gae"})
    return judge(groups, rule, "ok ppo_gae runs at the default (gamma=1, lam=0.95) and other settings")


# --------------------------------------------------------------------------- advantage_whitening


@claim(
    "advantage_whitening",
    source="000",
    text="\"normalising the advantages works: it makes the actor's loss stable; in a distributed run "
    'synchronise before normalising"',
    limits=(
        "Stability is read from one process's gradient norms; the source's advice to synchronise before "
        "normalising in a distributed run is checked by the 2-rank tests (equal to one process on the "
        "union), not by this row."
    ),
)
def advantage_whitening(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (per algorithm, algorithm.whiten_advantages on vs off): per seed, the coefficient of variation
    over iterations of the pre-clip gradient norm (train/grad_norm; off - on: positive = steadier with
    whitening), a scale-free measure (whitening rescales the advantages, hence the loss and its std),
    and the gold gain (on - off). Supported when steadier clearly and gold not clearly worse,
    contradicted when either is clearly the other way."""

    def rule(g: Group) -> Finding | None:
        if not g.has_metric(GRAD_NORM):
            return None
        metric = gold_first(g)
        parts = [
            ("grad-norm variation", partial(variation, metric=GRAD_NORM), False, True),
            (f"gain {metric}", gain_of(metric), True, False),
        ]
        found = two_values(g, parts, lambda steadier, kept: all_of(steadier, no_worse(kept)))
        return beside(found, g, [True, False], metric)

    groups = Study(runs, history).groups(["algorithm.whiten_advantages"])
    return judge(groups, rule, f"ok runs with algorithm.whiten_advantages true and false logging {GRAD_NORM}")


# --------------------------------------------------------------------------- adam_eps


@claim(
    "adam_eps",
    source="000",
    text='"Adam\'s epsilon also works, oddly"',
    limits=(
        "Adam's epsilon matters where second moments are tiny (half precision, large models, LoRA); in "
        "fp32 on a tiny model a small or no effect is expected, so a verdict here speaks for this scale "
        "only."
    ),
)
def adam_eps(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (optim.eps, largest vs smallest value: 1e-5 vs 1e-8): per seed, the gold gain (proxy without
    gold) at the largest minus at the smallest, a one-sided claim: supported when clearly positive by
    the one-sided test, contradicted when clearly negative by the two-sided one."""

    def rule(g: Group) -> Finding | None:
        ends = extreme_values(g)
        if ends is None:
            return None
        small, large = ends
        metric = gold_first(g)
        effect, numbers, seeds = difference(g, f"gain {metric}", large, small, gain_of(metric))
        found = finding([dataclasses.replace(effect, alternative="greater")], numbers, len(seeds))
        return beside(found, g, [small, large], metric)

    return judge(Study(runs, history).groups(["optim.eps"]), rule, "ok runs at two optim.eps values")


# --------------------------------------------------------------------------- ppo_epochs


@claim(
    "ppo_epochs",
    source="000",
    text='"too few epochs per batch learn slowly, too many overfit"; 001 reports one generation and one '
    "epoch as best",
    limits=(
        "Where the inverted U peaks depends on how fast a batch is overfitted; a tiny model at 64 samples "
        "per iteration overfits sooner than a large one, which moves the peak toward fewer epochs."
    ),
)
def ppo_epochs(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (per algorithm, algorithm.ppo_epochs, at least three values): an inverted U in the last-10%
    mean of gold (proxy without gold) at equal budget. With e1 the fewest epochs, eN the most and e* the
    middle value with the highest mean, per seed: rise = gold[e*] - gold[e1], fall = gold[e*] - gold[eN]
    and blow-up = KL[eN] - KL[e*] (last-10% means). Supported when the rise is clearly positive and the
    fall or the blow-up is; contradicted when the rise is clearly negative, or the fall and the blow-up
    both are."""

    def rule(g: Group) -> Finding | None:
        values = [v for v in g.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(values) < 3:
            return None
        metric = gold_first(g)
        gold, seeds = g.paired(values, last_tenth_of(metric))
        kl, _ = g.paired(values, last_tenth_of(KL))
        numbers = {**means(f"last-10% {metric}", gold, seeds), **means("last-10% KL", kl, seeds)}
        fewest, most = values[0], values[-1]
        peak = max(values[1:-1], key=lambda v: numbers[f"last-10% {metric} [{v}]"].mean)
        rise = seed_effect(
            f"last-10% {metric} [{peak}] - [{fewest}]", gold, seeds, lambda m: m[peak] - m[fewest]
        )
        fall = seed_effect(f"last-10% {metric} [{peak}] - [{most}]", gold, seeds, lambda m: m[peak] - m[most])
        blow_up = seed_effect(f"last-10% KL [{most}] - [{peak}]", kl, seeds, lambda m: m[most] - m[peak])

        def decide(direction: Direction) -> int:
            return all_of(direction(rise), any_of(direction(fall), direction(blow_up)))

        return finding([rise, fall, blow_up], numbers, len(seeds), decide)

    groups = Study(runs, history).groups(["algorithm.ppo_epochs"])
    return judge(groups, rule, "ok runs at three or more algorithm.ppo_epochs values")


# --------------------------------------------------------------------------- rollout_size


def seed_spread(curves: Mapping[int, np.ndarray]) -> dict[int, float]:
    """Per seed, its share of the variance across seeds: n / (n - 1) x its squared deviation from the
    seeds' mean, averaged over the points; the seeds' mean of it is the variance (ddof=1) across seeds,
    averaged over the points, and per seed it pairs with the other arms (Levene's approach, squared)."""
    if len(curves) < 2:
        return {}
    stacked = np.stack(list(curves.values()))
    share = len(curves) / (len(curves) - 1) * (stacked - stacked.mean(axis=0)) ** 2
    return {s: float(np.nanmean(row)) for s, row in zip(curves, share)}


@claim(
    "rollout_size",
    source="000",
    text='"too little data per round learns unstably, too much learns too slowly"',
    limits=(
        "Batch sizes of 16, 64 and 256 samples per iteration share one learning rate, so the row mixes "
        "batch size with the effective step size; a per-size tuned learning rate could change the "
        "instability half of the claim."
    ),
)
def rollout_size(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (rollout.samples_per_iteration at equal total budget; small = the smallest value, large = the
    largest). Matched budget points: K evenly spaced budgets up to the group's, K the fewest evaluations
    (after the first) of any run, so every arm is read at the same budgets (the evaluations themselves
    when they are spaced in samples). Unstable: per seed, its share of the arm's variance across seeds of
    gold (proxy without gold) at those points (`seed_spread`); effect: small's minus the largest
    other's. Slow: per seed, the budget to reach one absolute gold level, half way from the SFT policy
    to the best arm's peak (+inf, censored, for an arm that never reaches it); effect: large's minus the
    largest other's. Supported when both are clearly positive, contradicted when either is clearly
    negative."""

    def rule(g: Group) -> Finding | None:
        ends = extreme_values(g)
        if ends is None:
            return None
        small, large = ends
        values = g.values()
        metric = gold_first(g)
        points = min(int(h[metric].notna().sum()) - 1 if metric in h else 0 for h in g.histories.values())
        if points < 2:
            return None
        grid = np.linspace(g.budget / points, g.budget, points)
        curves = {v: g.curves(v, metric, grid) for v in values}
        spread = {v: seed_spread(curves[v]) for v in values}
        level = common_level(g, values, metric, share=0.5, of=max)
        budget, seeds = g.paired(values, lambda h, lv: samples_to_level(h, metric, lv), level)
        seeds = sorted(set(seeds).intersection(*spread.values()))
        unstable = lead(f"variance across seeds of {metric}", spread, seeds, small)
        slow = lead(f"budget ({g.unit}) to the {metric} level", budget, seeds, large)
        numbers = {
            "matched budget points": points,
            **means(f"variance across seeds of {metric}", spread, seeds),
            f"{metric} level": summary(level[s] for s in seeds),
            **means(f"budget ({g.unit}) to the {metric} level", budget, seeds),
        }
        return finding([unstable, slow], numbers, len(seeds))

    groups = Study(runs, history).groups(["rollout.samples_per_iteration"])
    return judge(groups, rule, "ok runs at several rollout.samples_per_iteration values")


# --------------------------------------------------------------------------- sampled_baseline

COATI = "critic_coati"


@claim(
    "sampled_baseline",
    source="000",
    text='"ColossalAI fits the reward with a critic, which gives tiny advantages and is hard to train; '
    'the mean reward of n sampled answers is enough, saves a network and works very well"',
    limits=(
        "critic_coati is rebuilt from ColossalAI's description (the critic's values averaged over the "
        "whole sequence, pads masked); a 4-layer critic is easy to fit, which can understate how hard a "
        "large critic is to train."
    ),
)
def sampled_baseline(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ppo_sampled, algorithm.baseline critic_coati, critic, sampled_mean): per seed, the gold gain
    (proxy without gold) of sampled_mean minus critic_coati's ("enough": not clearly below) and the mean
    over iterations of train/advantage_std, the smallest other baseline's minus critic_coati's (its
    advantages the smallest: positive). Supported when the advantages are clearly smallest with
    critic_coati and sampled_mean's gain not clearly below; contradicted when either is clearly the
    other way. Every baseline's gain is reported."""

    def rule(g: Group) -> Finding | None:
        if not {COATI, "sampled_mean"} <= set(g.cells) or not g.has_metric(ADVANTAGE_STD):
            return None
        metric = gold_first(g)
        values = g.values()
        gains, seeds = g.paired(values, gain_of(metric))
        spread, _ = g.paired(values, partial(mean_value, metric=ADVANTAGE_STD))
        enough = seed_effect(
            f"gain {metric} [sampled_mean] - [{COATI}]", gains, seeds, lambda m: m["sampled_mean"] - m[COATI]
        )
        tiny = lead("advantage std", spread, seeds, COATI, smallest=True)
        numbers = {**means(f"gain {metric}", gains, seeds), **means("advantage std", spread, seeds)}

        def decide(direction: Direction) -> int:
            return all_of(no_worse(direction(enough)), direction(tiny))

        return beside(finding([enough, tiny], numbers, len(seeds), decide), g, values, metric)

    groups = Study(runs, history).groups(["algorithm.baseline"], {"algorithm.name": "ppo_sampled"})
    return judge(
        groups,
        rule,
        f"ok ppo_sampled runs with algorithm.baseline {COATI} and sampled_mean logging {ADVANTAGE_STD}",
    )


# --------------------------------------------------------------------------- rm_pooling

LAST_TOKEN_RM = "reward_last"  # critic.init: a copy of the reward model trained at the last token


@claim(
    "rm_pooling",
    source="000",
    text='"scoring at the last token; weights trained this way are the best initialisation of the critic '
    'for multi-step PPO"',
    limits=(
        "Only the critic's starting weights differ (the reward is the last-token model in every arm); "
        "with a small body, the head start a reward model gives a critic over the SFT model may be "
        "smaller than at scale."
    ),
)
def rm_pooling(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ppo_gae, the reward the last-token reward model in every arm; critic.init: `reward_last`, the
    last-token reward model, against every other start, e.g. a mean-pooled reward model or SFT): per
    seed, against the best other start, the gold gain (proxy without gold; highest: positive), the
    budget to half that gain (earliest: positive; censored when a run never rises) and the mean
    train/explained_variance over the first 25% of the budget (higher: positive). Supported when the
    gain or the speed is clearly ahead and the explained variance is; contradicted when both gain and
    speed are clearly behind, or the explained variance is."""

    def rule(g: Group) -> Finding | None:
        if LAST_TOKEN_RM not in g.cells or not g.has_metric(EXPLAINED_VARIANCE):
            return None
        metric = gold_first(g)
        values = g.values()
        gains, seeds = g.paired(values, gain_of(metric))
        half, _ = g.paired(values, half_gain_of(metric))
        fit, _ = g.paired(values, partial(early_mean, metric=EXPLAINED_VARIANCE, fraction=EARLY))
        highest = lead(f"gain {metric}", gains, seeds, LAST_TOKEN_RM)
        earliest = lead(f"budget ({g.unit}) to half gain {metric}", half, seeds, LAST_TOKEN_RM, smallest=True)
        explains = lead("early explained variance", fit, seeds, LAST_TOKEN_RM)
        numbers = {
            **means(f"gain {metric}", gains, seeds),
            **means(f"budget ({g.unit}) to half gain {metric}", half, seeds),
            **means("early explained variance", fit, seeds),
        }

        def decide(direction: Direction) -> int:
            return all_of(any_of(direction(highest), direction(earliest)), direction(explains))

        return beside(finding([highest, earliest, explains], numbers, len(seeds), decide), g, values, metric)

    groups = Study(runs, history).groups(["critic.init"], {"algorithm.name": "ppo_gae"})
    return judge(
        groups,
        rule,
        f"ok ppo_gae runs with critic.init {LAST_TOKEN_RM} and another start logging {EXPLAINED_VARIANCE}",
    )


# --------------------------------------------------------------------------- rrhf_online


def time_to_level(history: pd.DataFrame, metric: str, level: float) -> float:
    """Wall-clock seconds (time/elapsed_s) where `metric` first reaches `level`; +inf when it never does."""
    budget = samples_to_level(history, metric, level)
    return value_at(history, ELAPSED, budget) if math.isfinite(budget) else budget


@claim(
    "rrhf_online",
    source="000",
    text='"the paper generates answers for all training data offline first: slow to produce and slow to '
    'train; making a small batch and training on it, as ColossalAI does, makes reward rise faster"',
    limits=(
        "Wall-clock includes evaluation and is measured on the machine named above; on a GPU, generating "
        "a whole offline buffer is relatively cheaper than on a CPU, which can narrow the wall-clock half "
        "of the claim."
    ),
)
def rrhf_online(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (rrhf, algorithm.mode online vs offline): one absolute gold level (proxy without gold) per
    seed, half way from the SFT policy to the better mode's peak; per seed, the budget (samples the
    updates trained on: offline's buffer is generated up front, so its generated samples would put every
    level at the whole budget) and the wall-clock (time/elapsed_s, evaluations and offline's up-front
    generation included: both modes evaluate at the same budgets) to reach it, offline minus online
    (+inf, censored, for a run that never reaches it). Supported when
    both are clearly positive, contradicted when either is clearly negative."""

    def rule(g: Group) -> Finding | None:
        modes = ["online", "offline"]
        if not set(modes) <= set(g.cells):
            return None
        metric = gold_first(g)
        level = common_level(g, modes, metric, share=0.5, of=max)
        budget, seeds = g.paired(modes, lambda h, lv: samples_to_level(h, metric, lv), level)
        clock, _ = g.paired(modes, lambda h, lv: time_to_level(h, metric, lv), level)

        def later(m: dict) -> float:
            return m["offline"] - m["online"]

        fewer = seed_effect(f"budget ({g.unit}) to the level [offline] - [online]", budget, seeds, later)
        sooner = seed_effect("seconds to the level [offline] - [online]", clock, seeds, later)
        numbers = {
            f"{metric} level": summary(level[s] for s in seeds),
            **means(f"budget ({g.unit}) to the level", budget, seeds),
            **means("seconds to the level", clock, seeds),
        }
        return beside(finding([fewer, sooner], numbers, len(seeds)), g, modes, metric)

    groups = Study(runs, history).groups(["algorithm.mode"], {"algorithm.name": "rrhf"})
    return judge(groups, rule, "ok rrhf runs with algorithm.mode online and offline")


# --------------------------------------------------------------------------- multi_adapter_memory

MEMORY_RATIO = 1.25


@claim(
    "multi_adapter_memory",
    source="000",
    text='"one base with several LoRA adapters is the actor, critic, reward and reference; four models for '
    "almost one model's memory\"",
    benchmark="python -m experiments.benchmark memory",
    limits=(
        "Measured by the memory benchmark on the model it is given (the tiny one by default, a GPT-2 "
        "shape on request); ratios with a 7B base, long sequences and mixed precision on a GPU may "
        "differ."
    ),
)
def multi_adapter_memory(
    runs: pd.DataFrame, history: pd.DataFrame, *, benchmarks: Iterable[Mapping] = ()
) -> Verdict:
    """Rule: per benchmark result of mode lora_multi_adapter (with and without gradient checkpointing),
    ratio = update_peak_bytes / one_model_train_bytes: the peak through a full RL update holding actor,
    critic, reward and reference, against one model's LoRA training step at the same setting. Supported
    when every ratio <= 1.25, contradicted when every ratio > 1.25, inconclusive when they disagree.
    Peak memory is close to deterministic, so one result decides (no seed interval).

    Expected benchmark files, `memory*.json` under the report's paths (experiments.benchmark memory),
    each one JSON object: `{"mode": "none" | "lora_multi_adapter", "gradient_checkpointing": bool,
    "update_peak_bytes": int, "one_model_train_bytes": int, "model": str, "seed": int}` (and the
    rollout-pass peaks, reported). A `none` result is reported (its ratio shows what separate models
    cost), not used by the rule. `runs` and `history` are unused: the benchmark measures the claim."""
    del runs, history  # the uniform signature of the rules
    ratios: dict[str, list[float]] = defaultdict(list)
    paths = set()
    for result in benchmarks:
        peak, one = result.get("update_peak_bytes"), result.get("one_model_train_bytes")
        if result.get("mode") in ("none", "lora_multi_adapter") and peak and one:
            variant = " + checkpointing" if result.get("gradient_checkpointing") else ""
            ratios[f"{result['mode']}{variant}"].append(peak / one)
            paths.add(str(result.get("path", "")))
    measured = [r for mode, values in ratios.items() if mode.startswith("lora") for r in values]
    if not measured:
        return Verdict("not run", note="needs memory*.json results of mode lora_multi_adapter")
    if all(r <= MEMORY_RATIO for r in measured):
        verdict = "supported"
    elif all(r > MEMORY_RATIO for r in measured):
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    numbers = {
        f"update peak / one model's LoRA step [{mode}]": summary(v) for mode, v in sorted(ratios.items())
    }
    return Verdict(verdict, numbers, len(measured), ", ".join(sorted(paths)))
