"""Comparing runs across knob values: the selection, the per-seed effects and the verdict they give.

The machinery every catalogue row (analysis.claims) shares:

1. Only runs with status ok count, and of a tuned sweep only its evaluation runs unless a row asks for
   its tuning grid (`Study(phase="tune")`). `Study.groups` selects runs by knob values (config columns). Runs
   that also differ in another swept knob are split into contexts, one `Group` per combination of the
   others (for example one per algorithm); `judge` applies a row's rule in each context, and the
   contexts must agree, or the verdict is inconclusive. Runs of one knob value and seed that differ in
   nothing else swept (a repeated job, or, where a row compares algorithms, algorithm hyperparameters)
   are averaged (a cell with a censored run is censored), and the note says so.
2. Equal budget: every run of a group is cut at the smallest budget any of them reached (`budget`, the
   units its updates consumed: analysis.records) before any measure is taken ("last-10% mean", "gain" and
   "samples-to-half-gain", the budget to half the gain, as defined in analysis.stats; a half gain never
   reached is censored, +inf). The group's `unit` names the budget's unit; where its runs count
   budget in different units (samples beside preference pairs), the cut is at equal units consumed,
   an equal-iteration comparison (at equal rollout.samples_per_iteration), not equal data, and the
   group's note (hence the verdict's) says so.
3. Per seed, then across seeds: a rule is written in terms of `Effect`s, numbers computed per seed
   (paired across knob values: only seeds present for every compared value count) whose sign says
   whether that part of the claim holds. Across seeds (analysis.inference) each effect gets one test:
   - a difference: the two-sided test of mean 0 that goes with its 95% interval (`inference.interval`:
     the t test with the t interval, or for skewed values the sign-flip test with its inversion), so
     the p-value and the interval never disagree; when a seed's value is censored (±inf: one arm never
     reached a level, so only the sign is known) the exact sign test instead, and a median, never a
     mean. A claim stated one-sided (`alternative="greater"`) is tested one-sided in its direction
     (the 95% one-sided bound, i.e. the 90% interval, must exclude 0) and two-sided against it;
   - an equivalence ("about the same": an effect with a `margin`): the TOST of |mean| < margin
     against the one-sided t test of the mean beyond the margin on its side, whichever p is smaller;
     a censored seed lies beyond the margin, so then only the one-sided sign test of "beyond" is made.
   The p-values of one Finding's effects are Holm-corrected together. An effect is clearly positive
   (negative) when its Holm-adjusted p < 0.05, its estimate points that way and, for a difference with
   a mean, its 95% interval excludes 0 on that side; anything else is noise. For an equivalence,
   positive means inside the margin. NaN seeds (no value, or both arms censored: undecided) are left
   out of the test (the effect's n counts the others; the arms' numbers count their censored runs).
   The rule combines its effects' directions (`all_of`, `any_of`, `no_worse`: +1, -1 or 0) and `holds`
   turns the result into supported, contradicted or inconclusive. One seed has no test, so it is
   always inconclusive; the note then gives the verdict the point estimates lean to (each effect
   judged by the sign of its mean, or its median when censored). An inconclusive verdict's note
   gives, for each effect that is noise, the seeds needed for 80% power at alpha 0.05 at the
   observed effect and spread (`Effect.power`).
4. "not run" when no group has what the rule needs (the knob, a needed value, or a metric).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from analysis.arms import of_phase
from analysis.inference import (
    ALPHA,
    MAX_SEEDS,
    Interval,
    holm,
    interval,
    mean_test,
    seeds_needed,
    sign_pvalue,
    sign_seeds_needed,
    t_pvalue,
    tost_pvalue,
)
from analysis.records import (
    BUDGET,
    knob_columns,
    row_keys,
    sort_key,
    swept_knobs,
    unit_label,
    units_of,
    value_key,
)
from analysis.stats import (
    Censored,
    censored_summary,
    curve,
    gain,
    initial_value,
    last_tenth_mean,
    max_value,
    samples_to_half_gain,
)

VERDICTS = ("supported", "contradicted", "inconclusive", "not run")


@dataclass(frozen=True)
class Verdict:
    """One catalogue row's verdict with the numbers behind it, the seeds and where the runs came from;
    `id` and `claim` are the row's, filled in by the claim registry (analysis.claims.registry)."""

    verdict: str
    numbers: dict = field(default_factory=dict)
    seeds: int = 0
    source: str = ""
    note: str = ""
    id: str = ""
    claim: str = ""


# --------------------------------------------------------------------------- effects and decisions


def summary(values: Iterable[float]) -> Interval | Censored:
    """Numbers across seeds: the mean and 95% interval, or the censored summary when a value is ±inf."""
    values = np.asarray(list(values), dtype=float)
    return censored_summary(values) if np.isinf(values).any() else interval(values)


class Test(NamedTuple):
    """An effect's test across seeds: the direction the seeds point, its p-value and the test's name."""

    sign: int
    p: float
    name: str


@dataclass(frozen=True)
class Effect:
    """A per-seed number whose sign says whether one part of a claim holds for that seed.

    NaN: no value (left out of the test); ±inf: censored, only its sign is known. With a `margin` the
    part is an equivalence, which holds for a seed when |value| < margin. `alternative="greater"`: the
    claim is one-sided (positive), tested one-sided in its direction."""

    name: str
    per_seed: Mapping[int, float]
    margin: float | None = None
    alternative: str = "two-sided"

    def values(self) -> np.ndarray:
        """The seeds' values, NaN left out."""
        values = np.asarray(list(self.per_seed.values()), dtype=float)
        return values[~np.isnan(values)]

    @property
    def censored(self) -> bool:
        return bool(np.isinf(self.values()).any())

    def summary(self) -> Interval | Censored:
        return summary(self.per_seed.values())

    def _signs(self) -> np.ndarray:
        """What the sign test counts: the values, or for an equivalence |value| - margin (+: beyond)."""
        values = self.values()
        return values if self.margin is None else np.abs(values) - self.margin

    def test(self) -> Test:
        """The direction the seeds point (+1, -1; 0 for fewer than two) and the p-value of its test."""
        values = self.values()
        if values.size < 2:
            return Test(0, 1.0, "no test: fewer than two seeds")
        if self.margin is None:
            if self.censored:  # only the sides are known
                sign, name, test = int(np.sign(np.sign(values).sum())), "sign test", sign_pvalue
            else:  # the test that goes with the effect's interval
                sign, (name, test) = int(np.sign(values.mean())), mean_test(values)
            if self.one_sided(sign):
                return Test(1, test(values, alternative="greater"), f"one-sided {name}")
            return Test(sign, test(values), name)
        if self.censored:
            return Test(-1, sign_pvalue(self._signs(), alternative="greater"), "sign test beyond the margin")
        inside = tost_pvalue(values, self.margin)
        side = 1.0 if values.mean() >= 0 else -1.0
        beyond = t_pvalue(side * values, self.margin, alternative="greater")
        if inside <= beyond:
            return Test(1, inside, "TOST inside the margin")
        return Test(-1, beyond, "t test beyond the margin")

    def one_sided(self, sign: int) -> bool:
        """True when a one-sided claim's direction is the one tested (the other way is two-sided)."""
        return self.alternative == "greater" and sign > 0

    def lean(self) -> int:
        """The direction of the point estimate alone: the mean's sign (the median's when censored); for
        an equivalence +1 when it lies inside the margin, else -1."""
        values = self.values()
        if values.size == 0:
            return 0
        centre = float(np.median(values) if self.censored else values.mean())
        if self.margin is None:
            return int(np.sign(centre))
        return 1 if abs(centre) < self.margin else -1

    def power(self) -> str:
        """Seeds needed for 80% power at alpha 0.05 at the observed effect and spread: the two-sided t
        test at |mean| / sd; for an equivalence the one-sided t test at |margin - |mean|| / sd; when
        censored, the sign test at the observed share of positive (beyond-the-margin) seeds."""
        values = self.values()
        if values.size < 2:
            return "no effect observed (one seed: sd undefined)"
        if self.censored:
            signs = self._signs()
            decided = signs[signs != 0]
            share = float((decided > 0).mean()) if decided.size else 0.5
            if share == 0.5 or (self.margin is not None and share < 0.5):
                return "no effect observed"
            side = "positive" if self.margin is None else "beyond the margin"
            one_sided = self.margin is not None or self.one_sided(1 if share > 0.5 else -1)
            needed = sign_seeds_needed(share, "greater" if one_sided else "two-sided")
            test = f"sign test, {share:.0%} of seeds {side}"
        else:
            distance = values.mean() if self.margin is None else self.margin - abs(values.mean())
            if distance == 0:
                return "no effect observed"
            sd = float(values.std(ddof=1))
            size = abs(distance) / sd if sd > 0 else math.inf
            one_sided = self.margin is not None or self.one_sided(int(np.sign(distance)))
            needed = seeds_needed(size, "larger" if one_sided else "two-sided")
            test = f"t test, effect size {size:.2g}"
        return f"{needed if needed is not None else f'> {MAX_SEEDS}'} seeds ({test})"


# how a rule reads an effect's direction: Finding.strict for the verdict, Effect.lean for the note
Direction = Callable[[Effect], int]
# a rule's decision: its effects' directions combined into the claim's (+1 holds, -1 fails, 0 open)
Decide = Callable[[Direction], int]


def holds(sign: int) -> str:
    """The verdict from a claim's direction: +1 supported, -1 contradicted, 0 inconclusive."""
    return {1: "supported", -1: "contradicted"}.get(sign, "inconclusive")


def all_of(*signs: int) -> int:
    """A conjunction: +1 when every part clearly holds, -1 when one clearly fails, else 0."""
    if -1 in signs:
        return -1
    return 1 if all(s == 1 for s in signs) else 0


def any_of(*signs: int) -> int:
    """A disjunction: +1 when one part clearly holds, -1 when every part clearly fails, else 0."""
    if 1 in signs:
        return 1
    return -1 if all(s == -1 for s in signs) else 0


def no_worse(sign: int) -> int:
    """A "no worse" condition holds unless the effect is clearly negative."""
    return -1 if sign == -1 else 1


@dataclass
class Finding:
    """What a rule found in one context: how to decide from its effects, and the numbers behind it."""

    decide: Decide
    effects: list[Effect]
    numbers: dict[str, Any]
    seeds: int
    note: str = ""

    def verdict(self, direction: Direction) -> str:
        return holds(self.decide(direction))

    @cached_property
    def adjusted(self) -> list[float]:
        """The effects' p-values (`Effect.test`), Holm-adjusted across this Finding, in order."""
        return holm([e.test().p for e in self.effects])

    def strict(self, effect: Effect) -> int:
        """+1 clearly positive, -1 clearly negative, 0 noise: Holm-adjusted p < 0.05 in the direction
        of the estimate and, for a difference with a mean, its 95% interval (a one-sided claim's 95%
        bound in its direction) excluding 0 on that side."""
        index = next(i for i, e in enumerate(self.effects) if e is effect)
        sign = effect.test().sign
        if sign == 0 or not self.adjusted[index] < ALPHA:
            return 0
        if effect.margin is None and not effect.censored:
            one_sided = effect.one_sided(sign)
            estimate = interval(effect.values(), 1 - 2 * ALPHA) if one_sided else effect.summary()
            return sign if (estimate.lo > 0 if sign > 0 else estimate.hi < 0) else 0
        return sign


# --------------------------------------------------------------------------- selecting runs


@dataclass
class Group:
    """The runs of one comparison context: knob value -> seed -> run ids, cut at a common budget
    (`budget`, in `unit`: one unit, or `samples; pairs for [dpo]` where the knob values' runs differ)."""

    label: str
    cells: dict[Any, dict[int, list[str]]]
    histories: dict[str, pd.DataFrame]
    budget: float
    sources: set[str]
    note: str = ""
    unit: str = "samples"

    def values(self) -> list:
        return sorted(self.cells, key=sort_key)

    def measure(
        self, value: Any, fn: Callable, levels: Mapping[int, float] | None = None
    ) -> dict[int, float]:
        """Per seed: `fn(history)` of each run of the cell, or `fn(history, levels[seed])` for a measure
        taken at a per-seed level (NaN where the seed has none), averaged over the runs of one seed (NaN
        left out; the average is +inf, censored, when one of them is)."""
        per_seed = {}
        for seed, run_ids in self.cells.get(value, {}).items():
            at = () if levels is None else (levels.get(seed, math.nan),)
            results = [fn(self.histories[r], *at) for r in run_ids]
            finite = [x for x in results if not math.isnan(x)]
            per_seed[seed] = float(np.mean(finite)) if finite else float("nan")
        return per_seed

    def paired(
        self, values: Sequence, fn: Callable, levels: Mapping[int, float] | None = None
    ) -> tuple[dict, list[int]]:
        """`measure` for each of `values` and the seeds all of them have."""
        per_value = {v: self.measure(v, fn, levels) for v in values}
        seeds = set.intersection(*(set(p) for p in per_value.values())) if per_value else set()
        return per_value, sorted(seeds)

    def curves(self, value: Any, metric: str, grid: np.ndarray) -> dict[int, np.ndarray]:
        """Per seed: the metric interpolated on a budget grid, averaged over the seed's runs of the cell."""
        return {
            seed: np.mean([curve(self.histories[r], metric, grid) for r in run_ids], axis=0)
            for seed, run_ids in self.cells.get(value, {}).items()
        }

    def has_metric(self, metric: str) -> bool:
        return all(metric in h.columns and h[metric].notna().any() for h in self.histories.values())


class Study:
    """The ok runs of one phase of a sweep (`of_phase`) and their RL rows, split into the comparison
    groups a row asks for."""

    def __init__(self, runs: pd.DataFrame, history: pd.DataFrame, phase: str = "evaluate") -> None:
        runs = of_phase(runs, phase)
        ok = runs[(runs["status"] == "ok") & runs["seed"].notna()]
        self.runs = ok.reset_index(drop=True)  # contexts are built from row labels, which must be unique
        self.histories = (
            {str(r): rows for r, rows in history.groupby("run", sort=False)} if len(history) else {}
        )

    def groups(
        self,
        knobs: Sequence[str],
        where: Mapping[str, Any] | None = None,
        min_values: int = 2,
        exclude: Sequence[str] = (),
    ) -> list[Group]:
        """Groups of runs with the `knobs` set, matching `where`, in each context of the other swept knobs
        (`exclude`: knobs that make no context, such as those a derived knob is made of).

        A group needs at least `min_values` distinct values of the knobs (a tuple when there are several).
        """
        runs = self.runs[self.runs["run"].astype(str).isin(self.histories)]
        for column, wanted in (where or {}).items():
            if column not in runs.columns:
                return []
            runs = runs[runs[column].map(value_key) == wanted]
        if any(k not in runs.columns for k in knobs):
            return []
        runs = runs[runs[list(knobs)].notna().all(axis=1)]
        exclude = [*knobs, *(where or {}), *exclude]
        if "algorithm.name" in knobs:
            # algorithms differ in their own hyperparameters by construction
            exclude += [c for c in knob_columns(runs) if c.startswith("algorithm.")]
        controls = swept_knobs(runs, exclude)
        contexts: dict[tuple, list[int]] = defaultdict(list)
        for index, key in zip(runs.index, row_keys(runs, controls)):
            contexts[key].append(index)
        groups = [self._group(runs.loc[rows], knobs, controls, key) for key, rows in contexts.items()]
        return [g for g in groups if len(g.cells) >= min_values]

    def _group(self, runs: pd.DataFrame, knobs: Sequence[str], controls: list[str], key: tuple) -> Group:
        cells: dict[Any, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for _, run in runs.iterrows():
            values = tuple(value_key(run[k]) for k in knobs)
            cells[values[0] if len(values) == 1 else values][int(run["seed"])].append(str(run["run"]))
        full = {r: self.histories[r] for r in runs["run"].astype(str)}
        budget = min(float(h[BUDGET].max()) for h in full.values())
        run_units = units_of(runs)
        unit = unit_label(
            {
                str(value): "/".join(sorted({run_units[r] for ids in by_seed.values() for r in ids}))
                for value, by_seed in sorted(cells.items(), key=lambda item: sort_key(item[0]))
            }
        )
        mixed = len(set(run_units.values())) > 1
        notes = []
        if mixed:
            notes.append(
                f"budgets in different units ({unit}): runs cut at {budget:.0f} units each, an "
                "equal-iteration comparison (at equal rollout.samples_per_iteration), not equal data"
            )
        elif any(float(h[BUDGET].max()) > budget for h in full.values()):
            notes.append(f"runs cut at {budget:.0f} {unit} (equal budget)")
        repeated = [ids for by_seed in cells.values() for ids in by_seed.values() if len(ids) > 1]
        if repeated:
            run_ids = runs["run"].astype(str)
            differing = sorted({k for ids in repeated for k in swept_knobs(runs[run_ids.isin(ids)])})
            notes.append(
                f"{len(repeated)} value/seed cells average several runs"
                + (f" (they differ in {', '.join(differing)})" if differing else "")
            )
        return Group(
            label=", ".join(f"{c}={v}" for c, v in zip(controls, key)),
            cells={v: dict(s) for v, s in cells.items()},
            histories={r: h[h[BUDGET] <= budget] for r, h in full.items()},
            budget=budget,
            sources=set(runs["source"].astype(str)),
            note="; ".join(notes),
            unit=unit,
        )


# --------------------------------------------------------------------------- shared rule pieces


def seed_effect(name: str, per_value: dict, seeds: Iterable[int], combine: Callable[[dict], float]) -> Effect:
    """An effect from the per-value measures of each seed: `combine({value: measure})`."""
    return Effect(name, {s: combine({v: m[s] for v, m in per_value.items()}) for s in seeds})


def means(label: str, per_value: dict, seeds: Sequence[int]) -> dict[str, Interval | Censored]:
    """Numbers: the `summary` of a measure for each knob value over the common seeds (the mean and
    interval, or the median and counts when some seed is censored)."""
    return {f"{label} [{v}]": summary(m[s] for s in seeds) for v, m in per_value.items()}


def difference(
    group: Group, label: str, x: Any, y: Any, fn: Callable[[pd.DataFrame], float]
) -> tuple[Effect, dict[str, Any], list[int]]:
    """The effect measure(x) - measure(y) per seed, with each side's numbers."""
    per_value, seeds = group.paired([x, y], fn)
    effect = seed_effect(f"{label} [{x}] - [{y}]", per_value, seeds, lambda m: m[x] - m[y])
    return effect, means(label, per_value, seeds), seeds


def lead(label: str, per_value: dict, seeds: Iterable[int], leader: Any, smallest: bool = False) -> Effect:
    """Per seed, how far `leader`'s measure is beyond every other value's: leader - the largest other,
    or the smallest other - leader for a claim that it is the smallest; positive = it leads. NaN when
    a value has none; ±inf when one side is censored (a level never reached)."""

    def ahead(m: dict) -> float:
        others = [x for v, x in m.items() if v != leader]
        if smallest:
            return float(np.min(others)) - m[leader]  # numpy's min and max propagate NaN
        return m[leader] - float(np.max(others))

    other = "smallest other" if smallest else "largest other"
    name = f"{other} - {label} [{leader}]" if smallest else f"{label} [{leader}] - {other}"
    return seed_effect(name, per_value, seeds, ahead)


def common_level(group: Group, values: Sequence, metric: str, share: float, of: Callable = min) -> dict:
    """Per seed, one absolute level of `metric` for all `values`: the start (their mean value at
    iteration 0, the seed's SFT policy) + `share` x `of` their rises to their peaks. With `min` and share 1
    the highest level every value reaches; with `max` and share 1/2 half way to the best one's peak, a
    level a slower one may never reach (censored). NaN where that rise is not positive."""
    start, _ = group.paired(values, partial(initial_value, metric=metric))
    peak, seeds = group.paired(values, partial(max_value, metric=metric))
    levels = {}
    for s in seeds:
        begin = float(np.mean([start[v][s] for v in values]))
        rise = of(peak[v][s] - begin for v in values)
        levels[s] = begin + share * rise if rise > 0 else math.nan
    return levels


def two_values(
    group: Group,
    parts: Sequence[tuple[str, Callable[[pd.DataFrame], float], Any, Any]],
    combine: Callable[..., int] = all_of,
) -> Finding | None:
    """Compare two knob values on each part (label, measure, x, y): the effect is measure(x) - measure(y)
    per seed, oriented so that positive is the claim's direction, and `combine(*signs)` turns the parts'
    signs, in order, into the claim's (every part must hold, by default). None when the group lacks one
    of the values."""
    if any(v not in group.cells for _, _, x, y in parts for v in (x, y)):
        return None
    effects, numbers, seeds = [], {}, []
    for label, fn, x, y in parts:
        effect, part_numbers, seeds = difference(group, label, x, y, fn)
        effects.append(effect)
        numbers.update(part_numbers)
    return finding(effects, numbers, len(seeds), lambda direction: combine(*map(direction, effects)))


def reporting(found: Finding | None, group: Group, value: Any, parts: Sequence[tuple]) -> Finding | None:
    """Add the measures of `parts` at a knob value the row reports but its rule does not use."""
    if found is not None and value in group.cells:
        for label, fn, *_ in parts:
            found.numbers[f"{label} [{value}]"] = summary(group.measure(value, fn).values())
    return found


def finding(
    effects: list[Effect], numbers: dict, seeds: int, decide: Decide | None = None, note: str = ""
) -> Finding:
    """A Finding whose numbers also hold every effect's `summary` and its p-value (Holm-adjusted across
    the effects when there are several). `decide` defaults to "every effect holds"."""

    def every(direction: Direction) -> int:
        return all_of(*map(direction, effects))

    found = Finding(decide or every, effects, dict(numbers), seeds, note)
    holm_note = ", Holm-adjusted" if len(effects) > 1 else ""
    for effect, p in zip(effects, found.adjusted):
        found.numbers[effect.name] = effect.summary()
        found.numbers[f"{effect.name}: p ({effect.test().name}{holm_note})"] = p
    return found


DIRECTION = {1: "clearly positive", -1: "clearly negative", 0: "noise"}


def judge(groups: list[Group], rule: Callable[[Group], Finding | None], missing: str) -> Verdict:
    """Apply `rule` in every group and combine: the groups must agree, else inconclusive."""
    found = [(g, f) for g in groups for f in [rule(g)] if f is not None]
    if not found:
        return Verdict("not run", note=f"needs {missing}")
    strict = {f.verdict(f.strict) for _, f in found}
    lean = {f.verdict(Effect.lean) for _, f in found}
    verdict = next(iter(strict)) if len(strict) == 1 else "inconclusive"
    seeds = min(f.seeds for _, f in found)
    notes = [n for g, f in found for n in (g.note, f.note) if n]
    if len(found) > 1:
        notes.append("contexts: " + "; ".join(f"{g.label}: {f.verdict(f.strict)}" for g, f in found))
    for g, f in found:
        if len(f.effects) > 1:  # say which part of a composite rule decided
            parts = "; ".join(f"{e.name}: {DIRECTION[f.strict(e)]}" for e in f.effects)
            notes.append(f"{g.label + ' ' if len(found) > 1 else ''}parts: {parts}")
    if verdict == "inconclusive" and len(lean) == 1 and (lean_verdict := next(iter(lean))) != "inconclusive":
        if len(strict) > 1:
            reason = "the contexts disagree"
        elif seeds < 2:
            reason = "one seed has no interval"
        else:
            reason = "the effect is inside the noise"
        notes.append(f"{reason}; the point estimates lean {lean_verdict}")
    if verdict == "inconclusive":
        power = [
            f"{g.label + ' ' if len(found) > 1 else ''}{e.name}: {e.power()}"
            for g, f in found
            for e in f.effects
            if f.strict(e) == 0
        ]
        notes.append(
            "seeds needed for 80% power at alpha 0.05: " + "; ".join(power)
            if power
            else "every effect is clear: more seeds would not change the verdict"
        )
    numbers = {}
    for g, f in found:
        prefix = f"{g.label}: " if len(found) > 1 and g.label else ""
        numbers.update({prefix + k: v for k, v in f.numbers.items()})
    return Verdict(
        verdict,
        numbers,
        seeds,
        ", ".join(sorted(set().union(*(g.sources for g, _ in found)))),
        "; ".join(notes),
    )


def last_tenth_of(metric: str) -> Callable[[pd.DataFrame], float]:
    return partial(last_tenth_mean, metric=metric)


def gain_of(metric: str) -> Callable[[pd.DataFrame], float]:
    return partial(gain, metric=metric)


def half_gain_of(metric: str) -> Callable[[pd.DataFrame], float]:
    """Budget to half the gain (`samples_to_half_gain`): +inf (censored) for a run that never gets there."""
    return partial(samples_to_half_gain, metric=metric)


def extreme_values(group: Group) -> tuple[Any, Any] | None:
    """The smallest and largest value of a numeric knob in the group."""
    values = [v for v in group.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return (values[0], values[-1]) if len(values) >= 2 else None
