"""Source 002: StackLLaMA (quotes translated). Its rows, in the catalogue's order."""

from __future__ import annotations

from functools import partial

import pandas as pd

from analysis.claims.metrics import GOLD, KL_ESTIMATE, KL_EXACT, NEGATIVE_SHARE, REWARD
from analysis.claims.registry import claim
from analysis.compare import (
    Effect,
    Finding,
    Group,
    Study,
    Verdict,
    difference,
    finding,
    gain_of,
    judge,
    means,
    seed_effect,
)
from analysis.stats import change, initial_value, last_tenth_mean, max_value, mean_value

# "gold falls below its peak by a stated margin": at least a quarter of the way back to the start
HACK_MARGIN = 0.25


def gold_fall(history: pd.DataFrame) -> float:
    """How far gold falls from its peak beyond the margin: (peak - last-10% mean) - 0.25 x (peak - initial);
    positive when the last-10% mean of gold is more than a quarter of the way back from its peak to the
    start."""
    peak = max_value(history, GOLD)
    return peak - last_tenth_mean(history, GOLD) - HACK_MARGIN * (peak - initial_value(history, GOLD))


@claim(
    "kl_penalty",
    source="002",
    text='"we rarely ran into reward hacking, probably thanks to the KL penalty"',
    limits=(
        "Reward hacking needs an exploitable reward model; toy_reviews_hard's is trained on a small, "
        "noisy preference set. Whether the default coefficient protects depends on how exploitable that "
        "model is."
    ),
)
def kl_penalty(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (kl.coef 0, the default = the largest value of the sweep, and values between, reported): per
    seed, with coef 0 the proxy gain (eval/reward_mean; rises: positive) and `gold_fall` (hacked:
    positive); at the default minus `gold_fall` (protected: positive). Supported when all three are
    clearly positive, contradicted when one is clearly negative. Needs a task with a gold reward."""

    def rule(g: Group) -> Finding | None:
        values = g.values()
        if 0 not in g.cells or not g.has_metric(GOLD) or not values[-1] > 0:
            return None
        default = values[-1]
        proxy, seeds = g.paired(values, gain_of(REWARD))
        fall, _ = g.paired(values, gold_fall)
        gold, _ = g.paired(values, gain_of(GOLD))
        rises = Effect("proxy gain [0]", {s: proxy[0][s] for s in seeds})
        hacked = Effect("gold fall beyond the margin [0]", {s: fall[0][s] for s in seeds})
        protected = Effect(
            f"- gold fall beyond the margin [{default}]", {s: -fall[default][s] for s in seeds}
        )
        numbers = {
            **means("proxy gain", proxy, seeds),
            **means("gold gain", gold, seeds),
            **means("gold fall beyond the margin", fall, seeds),
            "margin: share of the rise to the peak": HACK_MARGIN,
        }
        return finding([rises, hacked, protected], numbers, len(seeds))

    groups = Study(runs, history).groups(["kl.coef"])
    return judge(groups, rule, "ok runs with kl.coef 0 and the default (> 0) on a task with a gold reward")


def chase(history: pd.DataFrame) -> float:
    """How much further the exact KL drifts than the estimate: change of the exact - change of the
    estimate, first to last 10% of the iterations (positive: the estimate falls behind the truth)."""
    return change(history, KL_EXACT) - change(history, KL_ESTIMATE)


@claim(
    "negative_kl",
    source="002",
    text="constrained generation (a minimum length, suppressed EOS) gives negative KL estimates, and "
    '"the model chases the negative penalty, so training becomes unstable"',
    limits=(
        "The exact KL sums over a vocabulary of a few hundred words; the chasing under constrained "
        "generation is measurable at this scale, but its severity with 50k-token vocabularies is not."
    ),
)
def negative_kl(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (kl.estimator k1 and k3 x rollout.min_new_tokens 0 and its largest value T): per seed,
    - the share of negative k1 estimates (rollout/kl_negative_frac, mean over iterations) at T minus at 0
      (rises with the constraint: positive);
    - under the constraint with k1, the change of the exact KL (rollout/kl_exact_mean, first to last
      10% of the iterations; grows: positive) and minus the change of the k1 estimate
      (rollout/kl_estimate_mean; falls: positive): the chasing;
    - `chase` with k1 minus with k3, both at T (not with k3: positive).
    Supported when all four are clearly positive, contradicted when one is clearly negative."""

    def rule(g: Group) -> Finding | None:
        if not all(g.has_metric(m) for m in (NEGATIVE_SHARE, KL_ESTIMATE, KL_EXACT)):
            return None
        tokens = max(t for _, t in g.cells)
        k1, k3 = ("k1", tokens), ("k3", tokens)
        if tokens == 0 or not {k1, ("k1", 0), k3} <= set(g.cells):
            return None
        share = partial(mean_value, metric=NEGATIVE_SHARE)
        rise, numbers, seeds = difference(g, "negative k1 share", k1, ("k1", 0), share)
        drift, _ = g.paired([k1, k3], chase)
        exact, _ = g.paired([k1, k3], partial(change, metric=KL_EXACT))
        estimate, _ = g.paired([k1, k3], partial(change, metric=KL_ESTIMATE))
        seeds = sorted(set(seeds) & set(drift[k1]) & set(drift[k3]))
        grows = Effect(f"exact KL change {k1}", {s: exact[k1][s] for s in seeds})
        falls = Effect(f"- KL estimate change {k1}", {s: -estimate[k1][s] for s in seeds})
        not_k3 = seed_effect(f"chase {k1} - {k3}", drift, seeds, lambda m: m[k1] - m[k3])
        numbers.update(
            {
                **means("exact KL change", exact, seeds),
                **means("KL estimate change", estimate, seeds),
                **means("chase (exact - estimate change)", drift, seeds),
            }
        )
        return finding([rise, grows, falls, not_k3], numbers, len(seeds))

    groups = Study(runs, history).groups(["kl.estimator", "rollout.min_new_tokens"])
    return judge(
        groups,
        rule,
        "ok runs with kl.estimator k1 and k3 x rollout.min_new_tokens 0 and > 0 logging "
        f"{NEGATIVE_SHARE}, {KL_ESTIMATE} and {KL_EXACT}",
    )
