"""Source 001: DeepSpeed-Chat (its reports, paraphrased). Its rows, in the catalogue's order; ppo_epochs,
which 001 also speaks to, is with source 000's rows."""

from __future__ import annotations

import pandas as pd

from analysis.claims.metrics import GOLD, PRETRAIN_LOSS, beside, gold_first
from analysis.claims.registry import claim
from analysis.compare import (
    Direction,
    Effect,
    Finding,
    Group,
    Study,
    Verdict,
    all_of,
    difference,
    extreme_values,
    finding,
    gain_of,
    judge,
    last_tenth_of,
    means,
    no_worse,
    summary,
)


@claim(
    "ema",
    source="001",
    text="an EMA of the actor gives better final responses",
    limits=(
        "EMA decay 0.992 over a few hundred optimiser steps of a tiny model; the source's gain was on "
        "final responses of 1B+ models after long training."
    ),
)
def ema(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (runs with ema.enabled true, which evaluate the EMA weights as eval_ema/* beside the live
    weights' eval/*): per seed, last-10% mean of eval_ema/gold_mean - that of eval/gold_mean (reward_mean
    when the task has no gold reward), a paired comparison within each run. Supported when clearly positive,
    contradicted when clearly negative."""

    def rule(g: Group) -> Finding | None:
        name = "gold_mean" if g.has_metric("eval_ema/gold_mean") and g.has_metric(GOLD) else "reward_mean"
        if not g.has_metric(f"eval_ema/{name}"):
            return None
        ema_late, live_late = last_tenth_of(f"eval_ema/{name}"), last_tenth_of(f"eval/{name}")
        effect = Effect(f"last-10% {name} EMA - live", g.measure(True, lambda h: ema_late(h) - live_late(h)))
        numbers = {
            f"last-10% {name} [EMA]": summary(g.measure(True, ema_late).values()),
            f"last-10% {name} [live]": summary(g.measure(True, live_late).values()),
        }
        return finding([effect], numbers, len(effect.per_seed))

    groups = Study(runs, history).groups(["ema.enabled"], {"ema.enabled": True}, min_values=1)
    return judge(groups, rule, "ok runs with ema.enabled true that log eval_ema/*")


KEPT = 0.8  # "gold gain kept within 20%"


@claim(
    "ptx",
    source="001",
    text="mixing the pretraining objective into PPO prevents losing performance on public benchmarks (SQuAD)",
    limits=(
        "The pretraining corpus is a synthetic grammar of product notes in the task's words, learned "
        "during SFT; what is measured is the held-out loss on that corpus, not a real model's scores on "
        "public benchmarks."
    ),
)
def ptx(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ptx.coef 0 vs its largest value, the pretraining corpus not the RL objective): per seed, the
    rise of the held-out loss on that corpus (gain of eval/pretrain_loss; effect: rise without PTX -
    rise with it) and the gold gain (proxy without gold) kept (gain with PTX - 0.8 x gain without).
    Supported when the first is clearly positive and the second not clearly negative; contradicted
    when either is clearly negative."""

    def rule(g: Group) -> Finding | None:
        ends = extreme_values(g)
        if ends is None or ends[0] != 0 or not g.has_metric(PRETRAIN_LOSS):
            return None
        off, on = ends
        metric = gold_first(g)
        rise, numbers, seeds = difference(g, "pretraining loss rise", off, on, gain_of(PRETRAIN_LOSS))
        gains, _ = g.paired(ends, gain_of(metric))
        kept = Effect(
            f"gain {metric} [{on}] - {KEPT} x gain [{off}]",
            {s: gains[on][s] - KEPT * gains[off][s] for s in seeds},
        )
        numbers.update(means(f"gain {metric}", gains, seeds))

        def decide(direction: Direction) -> int:
            return all_of(direction(rise), no_worse(direction(kept)))

        return beside(finding([rise, kept], numbers, len(seeds), decide), g, ends, metric)

    groups = Study(runs, history).groups(["ptx.coef"])
    return judge(groups, rule, f"ok runs with ptx.coef 0 and > 0 logging {PRETRAIN_LOSS}")
