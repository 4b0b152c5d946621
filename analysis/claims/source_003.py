"""Source 003: alpaca-rlhf. Its row."""

from __future__ import annotations

from functools import partial

import pandas as pd

from analysis.claims.metrics import TRAIN_REWARD, beside, gold_first
from analysis.claims.registry import claim
from analysis.compare import Group, Study, Verdict, all_of, gain_of, judge, no_worse, reporting, two_values
from analysis.stats import step_std


@claim(
    "reward_normalization",
    source="003",
    text="normalises rewards with the reward model's chosen mean and std; the claim tested is that "
    "this helps",
    limits=(
        "The arms compare normalisations; with a reward model whose scores are already near unit scale, "
        "the arms differ little, and the result says little about rewards on other scales."
    ),
)
def reward_normalization(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (reward.normalize none vs rm_stats, the KL coefficient rescaled by the sweep so the penalty
    weighs the same against the reward's spread; running is reported, not used): per seed, the
    roughness of the training reward curve, iteration-to-iteration std of rollout/reward_mean (the raw
    reward-model score, on the same scale whatever the normalisation; none - rm_stats: smoother is
    positive) and the gold gain (proxy without gold; rm_stats - none). Supported when smoother clearly
    and the gain not clearly lower; contradicted when either is clearly the other way."""

    def rule(g: Group):
        metric = gold_first(g)
        parts = [
            ("training reward step std", partial(step_std, metric=TRAIN_REWARD), "none", "rm_stats"),
            (f"gain {metric}", gain_of(metric), "rm_stats", "none"),
        ]
        found = two_values(g, parts, lambda smoother, kept: all_of(smoother, no_worse(kept)))
        return beside(reporting(found, g, "running", parts), g, ["none", "rm_stats"], metric)

    groups = Study(runs, history).groups(["reward.normalize"])
    return judge(groups, rule, "ok runs with reward.normalize none and rm_stats")
