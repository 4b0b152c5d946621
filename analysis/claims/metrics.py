"""What the rules read: the metrics of the run records, the protocol's measure, and the arms of a sweep.

Gold first (shared/ABLATIONS.md, protocol item 1): on a task with a gold reward "better" is higher gold,
and the proxy (the reward model's score) and the KL are reported beside it (`beside`); without gold the
proxy is the measure. Every metric below is logged by backbone/trainer.py or an algorithm's loss
statistics; a rule whose metric is absent (a run of an older version, a knob left off) answers
"not run" and names it.
"""

from __future__ import annotations

from collections.abc import Sequence

from analysis.arms import read_tuning
from analysis.compare import Finding, Group, gain_of, last_tenth_of, summary

# held-out evaluation, every arm on the same prompts with common random numbers
REWARD = "eval/reward_mean"  # the proxy: the reward model's score
GOLD = "eval/gold_mean"
KL = "eval/kl_mean"  # sum over the response of log pi - log pi_ref (k1), per response
# training rows
GRAD_NORM = "train/grad_norm"  # the gradient norm before clipping, mean over the update's steps
ADVANTAGE_STD = "train/advantage_std"  # ppo_sampled: the std of the advantages before the loss
EXPLAINED_VARIANCE = "train/explained_variance"  # the critic's fit of the returns
TRAIN_REWARD = "rollout/reward_mean"  # the raw reward-model score, whatever the normalisation
NEGATIVE_SHARE = "rollout/kl_negative_frac"  # share of responses with a negative KL estimate
KL_ESTIMATE = "rollout/kl_estimate_mean"  # the configured estimator (kl.estimator), per response
KL_EXACT = "rollout/kl_exact_mean"  # the exact KL, summed over the vocabulary, per response
PRETRAIN_LOSS = "eval/pretrain_loss"  # held-out loss on a corpus that is not the RL objective
ELAPSED = "time/elapsed_s"  # wall-clock since the run started, evaluations included


def gold_first(group: Group) -> str:
    """The measure of "better": gold where every run of the group has it, else the proxy."""
    return GOLD if group.has_metric(GOLD) else REWARD


def beside(found: Finding | None, group: Group, values: Sequence, metric: str) -> Finding | None:
    """Add, per knob value, the last-10% mean of KL and, when gold is the measure, the proxy gain to the
    numbers."""
    if found is not None:
        for value in values:
            if metric == GOLD:
                found.numbers[f"proxy gain [{value}]"] = summary(
                    group.measure(value, gain_of(REWARD)).values()
                )
            kl = group.measure(value, last_tenth_of(KL))
            found.numbers[f"last-10% KL [{value}]"] = summary(kl.values())
    return found


def sweep_arms(runs) -> list[str]:
    """The algorithms a tuned sweep compared (its tuning.json), so that an arm whose runs all failed is
    missed rather than silently dropped; empty for a plain sweep, whose arms are the algorithms present."""
    return list(read_tuning(runs)) if len(runs) else []
