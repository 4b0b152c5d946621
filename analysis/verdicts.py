"""Verdicts on the claims of the ablation catalogue (shared/ABLATIONS.md), one function per row.

Every function takes the `runs` and `history` frames (analysis.records) and returns a `Verdict` for its
row: the selection, the equal-samples cut, the per-seed effects and how they combine across seeds are
shared (analysis.compare); each function's docstring states its rule. "Clearly positive" means the
effect's test across seeds (one-sample t; the sign test when a seed is censored) has a Holm-adjusted
p < 0.05 (Holm across the row's effects) with the estimate above 0 and, where there is a mean, its 95%
interval (t or bootstrap, named in the numbers) above 0; anything short of clearly positive or clearly
negative is noise, which leaves that part inconclusive, and the note then gives the seeds needed for
80% power.
A samples-to-half-gain that is never reached (the gain is not positive) is censored: reported as a
median with the counts reached and censored, and compared per seed by its side only, never averaged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import pandas as pd

from analysis.compare import (
    Direction,
    Effect,
    Finding,
    Group,
    Study,
    Verdict,
    all_of,
    any_of,
    difference,
    extreme_values,
    final_of,
    finding,
    gain_of,
    half_gain_of,
    holds,
    judge,
    means,
    no_worse,
    reporting,
    seed_effect,
    summary,
    two_values,
)
from analysis.stats import max_value, mean_value, step_std

REWARD, GOLD, KL = "eval/reward_mean", "eval/gold_mean", "eval/kl_mean"
ALGORITHMS = ("ppo_gae", "ppo_sampled", "rrhf")
PPOS = ("ppo_gae", "ppo_sampled")

CLAIMS = {
    "three_algorithms": "Multi-step PPO, single-step PPO and RRHF raise reward by about the same amount",
    "rrhf_fast_but_far": "RRHF raises reward fastest but drifts much further from the reference (KL) "
    "than PPO",
    "tuning_sensitivity": "RRHF needs almost no tuning; PPO needs careful tuning",
    "gae_defaults": "trlx's gamma=1, lambda=0.95 are good defaults; changing them can hurt a lot",
    "advantage_whitening": "Normalising advantages stabilises the actor loss",
    "adam_eps": "Adam's epsilon matters",
    "ppo_epochs": "Several PPO epochs per rollout batch beat one",
    "rollout_size": "Too few rollouts per iteration is unstable, too many learns slowly",
    "sampled_baseline": "Single-step PPO trains poorly with a critic fitted to the reward; the mean reward "
    "of n samples is a better baseline",
    "rm_pooling": "A last-token reward model initialises the multi-step PPO critic better than a "
    "token-averaging one",
    "rrhf_online": "RRHF trained online on small fresh batches beats generating everything offline first",
    "multi_adapter_memory": "One base model with LoRA adapters holds actor, critic, reward and reference "
    "for about the memory of one model",
    "ema": "An EMA of the actor gives better final responses than the last weights",
    "ptx": "Mixing the SFT loss into PPO keeps the model's language ability",
    "kl_penalty": "Without a KL penalty the policy hacks the reward model",
    "negative_kl": "Constrained generation yields negative KL estimates that training then chases",
    "reward_normalization": "Normalising rewards with the reward model's chosen-score statistics helps RL",
}


def _judge(row: str, groups: list[Group], rule: Callable[[Group], Finding | None], missing: str) -> Verdict:
    return judge(row, CLAIMS[row], groups, rule, missing)


# --------------------------------------------------------------------------- the rows


EQUIVALENCE_RATIO = 1.5


def log_gain_ratio(gains: Mapping[str, float]) -> float:
    """log(largest / smallest gain); +inf (censored above any margin) when a gain is not positive."""
    values = list(gains.values())
    if any(math.isnan(v) for v in values):
        return float("nan")
    return math.log(max(values) / min(values)) if min(values) > 0 else math.inf


def three_algorithms(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (an equivalence, margin log 1.5): per seed, the log ratio of the largest to the smallest of
    the three algorithms' gains of eval/reward_mean. Supported when the TOST rejects at 0.05 (the mean
    log ratio is below log 1.5; the ratio is >= 1, so only the upper bound binds); contradicted when the
    one-sided t test puts the mean log ratio above log 1.5 at 0.05; else inconclusive. A seed with a
    non-positive gain has an infinite ratio: censored above the margin and counted, not averaged; with
    one, only the one-sided sign test of "above the margin" can decide (contradicted), never supported.
    The gold gains (eval/gold_mean), where the runs have them, are reported first. Needs all three
    algorithms."""

    def rule(g: Group) -> Finding | None:
        if not set(ALGORITHMS) <= set(g.cells):
            return None
        proxy, seeds = g.paired(ALGORITHMS, gain_of(REWARD))
        gold, _ = g.paired(ALGORITHMS, gain_of(GOLD)) if g.has_metric(GOLD) else ({}, [])
        ratio = Effect(
            "log(largest / smallest proxy gain)",
            {s: log_gain_ratio({a: proxy[a][s] for a in ALGORITHMS}) for s in seeds},
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
        return finding(lambda direction: holds(direction(ratio)), [ratio], numbers, len(seeds), note)

    return _judge(
        "three_algorithms",
        Study(runs, history).groups(["algorithm.name"]),
        rule,
        "ok runs of all three algorithms",
    )


def rrhf_fast_but_far(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule: per seed, samples-to-half-gain of eval/reward_mean (censored, +inf, when the gain is not
    positive) and final eval/kl_mean per algorithm; effects: fewest PPO samples - RRHF samples (RRHF
    fastest) and RRHF KL - largest PPO KL (RRHF furthest). A seed where only one side is censored is
    decided by it (the censored side is slower: ±inf), one where both are is undecided (NaN); a
    censored seed makes the speed effect a sign test. Supported when both are clearly positive,
    contradicted when either is clearly negative."""

    def rule(g: Group) -> Finding | None:
        if not set(ALGORITHMS) <= set(g.cells):
            return None
        speed, seeds = g.paired(ALGORITHMS, half_gain_of(REWARD))
        kl, _ = g.paired(ALGORITHMS, final_of(KL))
        fast = seed_effect(
            "fewest PPO half-gain samples - RRHF's",
            speed,
            seeds,
            lambda m: min(m[p] for p in PPOS) - m["rrhf"],
        )
        far = seed_effect(
            "RRHF final KL - largest PPO final KL", kl, seeds, lambda m: m["rrhf"] - max(m[p] for p in PPOS)
        )
        numbers = {**means("samples to half gain", speed, seeds), **means("final KL", kl, seeds)}
        return finding(
            lambda direction: all_of(direction(fast), direction(far)), [fast, far], numbers, len(seeds)
        )

    return _judge(
        "rrhf_fast_but_far",
        Study(runs, history).groups(["algorithm.name"]),
        rule,
        "ok runs of all three algorithms",
    )


def tuning_sensitivity(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule: per algorithm and seed, the spread (max - min) of final eval/reward_mean across its
    algorithm.lr values (at least two; the catalogue's sweep has three); effect: smallest PPO spread -
    RRHF spread. Supported when clearly positive (RRHF's spread is the smallest), contradicted when
    clearly negative. Needs RRHF and at least one PPO."""

    def rule(g: Group) -> Finding | None:
        lrs = defaultdict(list)
        for algorithm, lr in g.cells:
            lrs[algorithm].append((algorithm, lr))
        algorithms = [a for a in ALGORITHMS if len(lrs[a]) >= 2]
        if "rrhf" not in algorithms or len(algorithms) < 2:
            return None
        per_cell, seeds = g.paired([c for a in algorithms for c in lrs[a]], final_of(REWARD))
        spread = {
            a: {s: max(per_cell[c][s] for c in lrs[a]) - min(per_cell[c][s] for c in lrs[a]) for s in seeds}
            for a in algorithms
        }
        effect = seed_effect(
            "smallest PPO lr spread - RRHF's",
            spread,
            seeds,
            lambda m: min(m[a] for a in algorithms if a != "rrhf") - m["rrhf"],
        )
        numbers = {
            **means("final reward spread across lr", spread, seeds),
            **{f"lr values [{a}]": len(lrs[a]) for a in algorithms},
        }
        return finding(lambda direction: holds(direction(effect)), [effect], numbers, len(seeds))

    # the catalogue's sweep scales each algorithm's own lr (optim.lr_scale); a sweep of absolute
    # values (algorithm.lr) reads the same way
    scaled = "optim.lr_scale" in runs and runs["optim.lr_scale"].nunique() > 1
    groups = Study(runs, history).groups(["algorithm.name", "optim.lr_scale" if scaled else "algorithm.lr"])
    return _judge(
        "tuning_sensitivity", groups, rule, "ok runs of RRHF and a PPO at several algorithm.lr values"
    )


GAE_DEFAULT = (1.0, 0.95)


def gae_defaults(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ppo_gae, settings = (algorithm.gamma, algorithm.lam) pairs, default (1, 0.95)): per seed,
    final eval/reward_mean per setting. The best setting is the one with the highest mean. Contradicted
    when default - best is clearly negative (the default is outside the best group); supported when it
    is not and default - some other setting is clearly positive (that setting is clearly worse);
    inconclusive otherwise."""

    def rule(g: Group) -> Finding | None:
        if GAE_DEFAULT not in g.cells:
            return None
        per_value, seeds = g.paired(g.values(), final_of(REWARD))
        numbers = means("final reward (gamma, lam)", per_value, seeds)
        best = max(per_value, key=lambda v: numbers[f"final reward (gamma, lam) [{v}]"].mean)
        to_best = seed_effect(f"default - best {best}", per_value, seeds, lambda m: m[GAE_DEFAULT] - m[best])
        worse = [
            seed_effect(f"default - {v}", per_value, seeds, lambda m, v=v: m[GAE_DEFAULT] - m[v])
            for v in per_value
            if v != GAE_DEFAULT
        ]

        def decide(direction: Direction) -> str:
            if direction(to_best) == -1:
                return "contradicted"
            return "supported" if any(direction(e) == 1 for e in worse) else "inconclusive"

        return finding(decide, [to_best, *worse], numbers, len(seeds))

    groups = Study(runs, history).groups(["algorithm.gamma", "algorithm.lam"], {"algorithm.name": "ppo_gae"})
    return _judge(
        "gae_defaults", groups, rule, "ok ppo_gae runs at the default (gamma=1, lam=0.95) and other settings"
    )


def advantage_whitening(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (per algorithm, algorithm.whiten_advantages on vs off): per seed, iteration-to-iteration std
    of train/policy_loss (off - on: positive = steadier with whitening) and final eval/reward_mean
    (on - off). Supported when steadier clearly and reward not clearly worse, contradicted when either
    is clearly the other way. (Whitening rescales the advantages, so part of a change in the loss's
    std is its scale, not its stability.)"""

    def rule(g: Group) -> Finding | None:
        parts = [
            ("policy loss step std", partial(step_std, metric="train/policy_loss"), False, True),
            ("final reward", final_of(REWARD), True, False),
        ]
        return two_values(g, parts, lambda steadier, reward: all_of(steadier, no_worse(reward)))

    groups = Study(runs, history).groups(["algorithm.whiten_advantages"])
    return _judge(
        "advantage_whitening", groups, rule, "ok runs with algorithm.whiten_advantages true and false"
    )


def adam_eps(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (optim.eps, smallest vs largest value): per seed, d = final eval/reward_mean at the largest
    eps - at the smallest, and a margin m = 10% of the mean |gain| of the two runs. Effects d - m and
    -d - m: supported when either is clearly positive (the reward differs by more than the margin,
    beyond the noise); contradicted when both are clearly negative (the difference is clearly within
    the margin); inconclusive otherwise."""

    def rule(g: Group) -> Finding | None:
        ends = extreme_values(g)
        if ends is None:
            return None
        small, large = ends
        final, seeds = g.paired(ends, final_of(REWARD))
        gains, _ = g.paired(ends, gain_of(REWARD))
        margin = {s: 0.1 * (abs(gains[small][s]) + abs(gains[large][s])) / 2 for s in seeds}
        higher = Effect(
            f"final reward [{large}] - [{small}] - margin",
            {s: final[large][s] - final[small][s] - margin[s] for s in seeds},
        )
        lower = Effect(
            f"final reward [{small}] - [{large}] - margin",
            {s: final[small][s] - final[large][s] - margin[s] for s in seeds},
        )
        numbers = {**means("final reward", final, seeds), "margin (10% of gain)": summary(margin.values())}
        return finding(
            lambda direction: any_of(direction(higher), direction(lower)),
            [higher, lower],
            numbers,
            len(seeds),
        )

    return _judge(
        "adam_eps", Study(runs, history).groups(["optim.eps"]), rule, "ok runs at two optim.eps values"
    )


def ppo_epochs(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (per algorithm, algorithm.ppo_epochs values): per seed, final eval/reward_mean per value.
    With e1 the fewest epochs and e* the larger value with the highest mean: supported when reward at
    e* - at e1 is clearly positive; contradicted when reward at e1 - at e is clearly positive for every
    larger e; inconclusive otherwise. Values beyond e* may fall back ("up to the point of KL
    blow-up"): their final eval/kl_mean is in the numbers."""

    def rule(g: Group) -> Finding | None:
        ends = extreme_values(g)
        if ends is None:
            return None
        fewest = ends[0]
        more = [v for v in g.values() if v != fewest]
        reward, seeds = g.paired(g.values(), final_of(REWARD))
        kl, _ = g.paired(g.values(), final_of(KL))
        numbers = {**means("final reward", reward, seeds), **means("final KL", kl, seeds)}
        best = max(more, key=lambda v: numbers[f"final reward [{v}]"].mean)
        rise = seed_effect(
            f"final reward [{best}] - [{fewest}]", reward, seeds, lambda m: m[best] - m[fewest]
        )
        falls = [
            seed_effect(f"final reward [{fewest}] - [{v}]", reward, seeds, lambda m, v=v: m[fewest] - m[v])
            for v in more
        ]

        def decide(direction: Direction) -> str:
            if direction(rise) == 1:
                return "supported"
            return "contradicted" if all(direction(e) == 1 for e in falls) else "inconclusive"

        return finding(decide, [rise, *falls], numbers, len(seeds))

    return _judge(
        "ppo_epochs",
        Study(runs, history).groups(["algorithm.ppo_epochs"]),
        rule,
        "ok runs at several algorithm.ppo_epochs values",
    )


def rollout_size(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (rollout.samples_per_iteration; small = smallest value, large = largest, medium = the rest):
    per seed, the roughness of the eval reward curve (iteration-to-iteration std of eval/reward_mean;
    the eval prompts and samples are the same for every batch size, so it measures the policy's jumps,
    not the batch's sampling noise) and samples-to-half-gain of eval/reward_mean (censored, +inf, when
    the gain is not positive). Effects: roughness at small - the largest other roughness, and half-gain
    samples at large - the largest other (±inf when one side is censored, undecided when both are).
    Supported when both are clearly positive, contradicted when either is clearly negative."""

    def rule(g: Group) -> Finding | None:
        ends = extreme_values(g)
        if ends is None:
            return None
        small, large = ends
        values = g.values()
        rough, seeds = g.paired(values, partial(step_std, metric=REWARD))
        slow, _ = g.paired(values, half_gain_of(REWARD))
        unstable = seed_effect(
            f"roughness [{small}] - largest other",
            rough,
            seeds,
            lambda m: m[small] - max(m[v] for v in values if v != small),
        )
        slowest = seed_effect(
            f"half-gain samples [{large}] - largest other",
            slow,
            seeds,
            lambda m: m[large] - max(m[v] for v in values if v != large),
        )
        numbers = {
            **means("eval reward roughness", rough, seeds),
            **means("samples to half gain", slow, seeds),
        }
        return finding(
            lambda direction: all_of(direction(unstable), direction(slowest)),
            [unstable, slowest],
            numbers,
            len(seeds),
        )

    groups = Study(runs, history).groups(["rollout.samples_per_iteration"])
    return _judge("rollout_size", groups, rule, "ok runs at several rollout.samples_per_iteration values")


def sampled_baseline(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ppo_sampled, algorithm.baseline critic vs sampled_mean): per seed, gain of eval/reward_mean,
    effect sampled_mean - critic. Supported when clearly positive, contradicted when clearly negative.
    A leave_one_out run is reported in the numbers, not used."""

    def rule(g: Group) -> Finding | None:
        parts = [("gain", gain_of(REWARD), "sampled_mean", "critic")]
        return reporting(two_values(g, parts, holds), g, "leave_one_out", parts)

    groups = Study(runs, history).groups(["algorithm.baseline"], {"algorithm.name": "ppo_sampled"})
    return _judge(
        "sampled_baseline",
        groups,
        rule,
        "ok ppo_sampled runs with algorithm.baseline critic and sampled_mean",
    )


def rm_pooling(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ppo_gae, reward.pooling last vs mean): the two poolings are different reward models, so
    the measure is eval/gold_mean where the runs have it (eval/reward_mean otherwise). Per seed: gain
    (last - mean) and samples-to-half-gain (mean - last: positive = last is faster; censored when a
    run's gain is not positive, compared by its side only). Supported when
    either is clearly positive ("larger or faster"), contradicted when both are clearly negative."""

    def rule(g: Group) -> Finding | None:
        metric = GOLD if g.has_metric(GOLD) else REWARD
        parts = [
            (f"gain {metric}", gain_of(metric), "last", "mean"),
            (f"half-gain samples {metric}", half_gain_of(metric), "mean", "last"),
        ]
        return two_values(g, parts, any_of)

    groups = Study(runs, history).groups(["reward.pooling"], {"algorithm.name": "ppo_gae"})
    return _judge("rm_pooling", groups, rule, "ok ppo_gae runs with reward.pooling last and mean")


def rrhf_online(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (rrhf, algorithm.mode online vs offline): per seed, final eval/reward_mean at equal samples,
    effect online - offline. Supported when clearly positive, contradicted when clearly negative."""

    def rule(g: Group) -> Finding | None:
        return two_values(g, [("final reward", final_of(REWARD), "online", "offline")], holds)

    groups = Study(runs, history).groups(["algorithm.mode"], {"algorithm.name": "rrhf"})
    return _judge("rrhf_online", groups, rule, "ok rrhf runs with algorithm.mode online and offline")


MEMORY_RATIO = 1.25


def multi_adapter_memory(
    runs: pd.DataFrame, history: pd.DataFrame, benchmarks: Iterable[Mapping] = ()
) -> Verdict:
    """Rule: per benchmark result of mode lora_multi_adapter, ratio = peak_bytes / one_model_bytes.
    Supported when every ratio <= 1.25, contradicted when every ratio > 1.25, inconclusive when they
    disagree. Peak memory is close to deterministic, so one result decides (no seed interval).

    Expected benchmark files, `memory*.json` under the report's paths, each one JSON object:
    `{"mode": "none" | "lora_multi_adapter", "peak_bytes": int (peak accelerator or process memory of
    one RL step holding actor, critic, reward and reference), "one_model_bytes": int (the same measure
    with only one model of the same base loaded), "model": str (optional), "seed": int (optional)}`.
    A `none` result is reported (its ratio shows what separate models cost), not used by the rule.
    `runs` and `history` are unused: the claim is measured by the benchmark, not by training runs."""
    del runs, history  # the uniform signature of the verdict functions
    ratios: dict[str, list[float]] = defaultdict(list)
    paths = set()
    for result in benchmarks:
        peak, one = result.get("peak_bytes"), result.get("one_model_bytes")
        if result.get("mode") in ("none", "lora_multi_adapter") and peak and one:
            ratios[result["mode"]].append(peak / one)
            paths.add(str(result.get("path", "")))
    measured = ratios["lora_multi_adapter"]
    row = "multi_adapter_memory"
    if not measured:
        return Verdict(
            row, CLAIMS[row], "not run", note="needs memory*.json results of mode lora_multi_adapter"
        )
    if all(r <= MEMORY_RATIO for r in measured):
        verdict = "supported"
    elif all(r > MEMORY_RATIO for r in measured):
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    numbers = {f"peak / one model [{mode}]": summary(values) for mode, values in ratios.items()}
    return Verdict(row, CLAIMS[row], verdict, numbers, len(measured), ", ".join(sorted(paths)))


def ema(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (runs with ema.enabled true, which evaluate the EMA weights as eval_ema/* beside the live
    weights' eval/*): per seed, final eval_ema/gold_mean - final eval/gold_mean (reward_mean when the
    task has no gold reward), a paired comparison within each run. Supported when clearly positive,
    contradicted when clearly negative."""

    def rule(g: Group) -> Finding | None:
        metric = "gold_mean" if g.has_metric("eval_ema/gold_mean") and g.has_metric(GOLD) else "reward_mean"
        if not g.has_metric(f"eval_ema/{metric}"):
            return None
        ema_final, live_final = final_of(f"eval_ema/{metric}"), final_of(f"eval/{metric}")
        effect = Effect(f"final {metric} EMA - live", g.measure(True, lambda h: ema_final(h) - live_final(h)))
        numbers = {
            f"final {metric} [EMA]": summary(g.measure(True, ema_final).values()),
            f"final {metric} [live]": summary(g.measure(True, live_final).values()),
        }
        return finding(lambda direction: holds(direction(effect)), [effect], numbers, len(effect.per_seed))

    groups = Study(runs, history).groups(["ema.enabled"], {"ema.enabled": True}, min_values=1)
    return _judge("ema", groups, rule, "ok runs with ema.enabled true that log eval_ema/*")


def ptx(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (ptx.coef 0 vs its largest value): per seed, the rise of the held-out SFT loss (gain of
    eval/sft_loss; effect: rise without PTX - rise with it) and the reward gain kept (gain of
    eval/reward_mean with PTX - 0.8 x gain without). Supported when the first is clearly positive and
    the second not clearly negative; contradicted when either is clearly negative."""

    def rule(g: Group) -> Finding | None:
        ends = extreme_values(g)
        if ends is None or ends[0] != 0 or not g.has_metric("eval/sft_loss"):
            return None
        off, on = ends
        sft_rise, numbers, seeds = difference(g, "SFT loss rise", off, on, gain_of("eval/sft_loss"))
        gains, _ = g.paired(ends, gain_of(REWARD))
        kept = Effect(
            f"gain [{on}] - 0.8 x gain [{off}]", {s: gains[on][s] - 0.8 * gains[off][s] for s in seeds}
        )
        numbers.update(means("gain", gains, seeds))
        return finding(
            lambda direction: all_of(direction(sft_rise), no_worse(direction(kept))),
            [sft_rise, kept],
            numbers,
            len(seeds),
        )

    return _judge(
        "ptx",
        Study(runs, history).groups(["ptx.coef"]),
        rule,
        "ok runs with ptx.coef 0 and > 0 logging eval/sft_loss",
    )


def kl_penalty(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (kl.coef 0; runs with a positive coefficient are reported for contrast): per seed of the
    coef-0 runs, gain of eval/reward_mean (the proxy) and minus the gain of eval/gold_mean (gold falls).
    Supported when both are clearly positive, contradicted when either is clearly negative. Needs a
    task with a gold reward."""

    def rule(g: Group) -> Finding | None:
        if 0 not in g.cells or not g.has_metric(GOLD):
            return None
        proxy, seeds = g.paired(g.values(), gain_of(REWARD))
        gold, _ = g.paired(g.values(), gain_of(GOLD))
        rises = Effect("proxy gain [0]", {s: proxy[0][s] for s in seeds})
        falls = Effect("- gold gain [0]", {s: -gold[0][s] for s in seeds})
        numbers = {**means("proxy gain", proxy, seeds), **means("gold gain", gold, seeds)}
        return finding(
            lambda direction: all_of(direction(rises), direction(falls)), [rises, falls], numbers, len(seeds)
        )

    groups = Study(runs, history).groups(["kl.coef"], min_values=1)
    return _judge("kl_penalty", groups, rule, "ok runs with kl.coef 0 on a task with a gold reward")


NEGATIVE_SHARE = "rollout/kl_negative_frac"


def negative_kl(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (kl.estimator x rollout.min_new_tokens 0 vs its largest value): per run, the mean share of
    negative per-response KL estimates (rollout/kl_negative_frac) over its iterations. For every
    estimator other than k3, per seed: share at the largest min_new_tokens - share at 0 (rises with the
    constraint). For k3: the largest share over all its runs and rows must be exactly 0 (k3 >= 0 by
    construction; one negative estimate contradicts). Supported when every rise is clearly positive and
    k3 runs exist and never go negative; contradicted when a rise is clearly negative or a k3 run has a
    negative estimate; inconclusive otherwise (including no k3 runs)."""

    def rule(g: Group) -> Finding | None:
        if not g.has_metric(NEGATIVE_SHARE):
            return None
        by_estimator = defaultdict(list)
        for estimator, tokens in g.cells:
            by_estimator[estimator].append(tokens)
        share = partial(mean_value, metric=NEGATIVE_SHARE)
        effects, numbers, seeds = [], {}, []
        for estimator, tokens in sorted(by_estimator.items()):
            if estimator == "k3" or 0 not in tokens or max(tokens) == 0:
                continue
            rise, part, seeds = difference(
                g, f"negative share {estimator}", (estimator, max(tokens)), (estimator, 0), share
            )
            effects.append(rise)
            numbers.update(part)
        if not effects:
            return None
        k3_runs = [
            r
            for (estimator, _), by_seed in g.cells.items()
            if estimator == "k3"
            for ids in by_seed.values()
            for r in ids
        ]
        k3_max = max((max_value(g.histories[r], NEGATIVE_SHARE) for r in k3_runs), default=float("nan"))
        k3_sign = 0 if math.isnan(k3_max) else (1 if k3_max == 0 else -1)
        numbers["k3 largest negative share"] = k3_max
        note = "" if k3_runs else "no k3 runs: its half of the claim is untested"
        return finding(
            lambda direction: all_of(*map(direction, effects), k3_sign), effects, numbers, len(seeds), note
        )

    groups = Study(runs, history).groups(["kl.estimator", "rollout.min_new_tokens"])
    return _judge(
        "negative_kl", groups, rule, "ok runs with rollout.min_new_tokens 0 and > 0 logging " + NEGATIVE_SHARE
    )


def reward_normalization(runs: pd.DataFrame, history: pd.DataFrame) -> Verdict:
    """Rule (reward.normalize none vs rm_stats; running is reported, not used): per seed, the roughness
    of the training reward curve, iteration-to-iteration std of rollout/reward_mean (the raw reward-model
    score, on the same scale whatever the normalisation; effect none - rm_stats) and the gain of
    eval/reward_mean (rm_stats - none). Supported when smoother clearly and the gain not clearly lower;
    contradicted when either is clearly the other way."""

    def rule(g: Group) -> Finding | None:
        rough = partial(step_std, metric="rollout/reward_mean")
        parts = [
            ("reward step std", rough, "none", "rm_stats"),
            ("gain", gain_of(REWARD), "rm_stats", "none"),
        ]
        found = two_values(g, parts, lambda smoother, kept: all_of(smoother, no_worse(kept)))
        return reporting(found, g, "running", parts)

    groups = Study(runs, history).groups(["reward.normalize"])
    return _judge("reward_normalization", groups, rule, "ok runs with reward.normalize none and rm_stats")


ROWS: dict[str, Callable[[pd.DataFrame, pd.DataFrame], Verdict]] = {
    "three_algorithms": three_algorithms,
    "rrhf_fast_but_far": rrhf_fast_but_far,
    "tuning_sensitivity": tuning_sensitivity,
    "gae_defaults": gae_defaults,
    "advantage_whitening": advantage_whitening,
    "adam_eps": adam_eps,
    "ppo_epochs": ppo_epochs,
    "rollout_size": rollout_size,
    "sampled_baseline": sampled_baseline,
    "rm_pooling": rm_pooling,
    "rrhf_online": rrhf_online,
    "multi_adapter_memory": multi_adapter_memory,
    "ema": ema,
    "ptx": ptx,
    "kl_penalty": kl_penalty,
    "negative_kl": negative_kl,
    "reward_normalization": reward_normalization,
}


def evaluate_all(
    runs: pd.DataFrame, history: pd.DataFrame, benchmarks: Iterable[Mapping] = ()
) -> list[Verdict]:
    """Every catalogue row's verdict, in the catalogue's order."""
    return [
        multi_adapter_memory(runs, history, benchmarks) if fn is multi_adapter_memory else fn(runs, history)
        for fn in ROWS.values()
    ]
