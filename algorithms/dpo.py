"""DPO: Direct Preference Optimization (Rafailov et al., 2023).

RLHF maximises reward under a KL constraint to the reference (SFT) policy,

    max_pi  E_{x, y ~ pi} [r(x, y)] - beta * KL(pi(. | x) || pi_ref(. | x)),

whose optimum is pi*(y | x) = pi_ref(y | x) exp(r(x, y) / beta) / Z(x). Read backwards, a policy
implies a reward, up to a term of the prompt alone:

    r_hat(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))               the implicit reward

Under the Bradley-Terry model p(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)) the prompt's term
cancels within a pair, and the reward model's likelihood becomes a loss on the policy itself:

    h = (log pi(y_w | x) - log pi_ref(y_w | x)) - (log pi(y_l | x) - log pi_ref(y_l | x))
    L = -log sigmoid(beta * h)

log pi(y | x) = sum_t log pi(y_t | x, y_<t) is the sequence log-prob, summed over the response's tokens,
EOS included, pads excluded. No reward model, no critic, no sampling in the loss: beta is the KL
coefficient of the objective above (the backbone's KL controller is not read). L is computed per pair
and averaged over the pairs of a minibatch (a pair is one group, never split).

Conservative DPO (``label_smoothing`` eps; Mitchell 2023, TRL's ``label_smoothing``) takes each label as
flipped with probability eps:

    L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

``mode=offline``, the paper's setting: the pairs are the task's train preference pairs (those the reward
model was fitted on), labelled by the data; nothing is generated. ``mode=online`` (online AI feedback,
Guo et al. 2024; TRL's OnlineDPOTrainer): each iteration two responses per prompt are sampled from the
current policy and the reward model's higher-scored one is y_w. A pair the reward model scores equal
(two identical samples, mostly) states no preference: it is masked out of the loss and the fraction of
such pairs is logged as ``train/tie_fraction``.

Statistics, named as TRL names them (means over the pairs that count):
    rewards/chosen, rewards/rejected    r_hat(y_w), r_hat(y_l)
    rewards/margins                     r_hat(y_w) - r_hat(y_l) = beta * h
    rewards/accuracies                  the fraction of pairs with r_hat(y_w) > r_hat(y_l)
    logps/chosen, logps/rejected        log pi(y_w | x), log pi(y_l | x)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from algorithms.base import Algorithm, AlgorithmConfig, Policy, register
from backbone.batch import Batch, Rollouts
from backbone.config import KLConfig, RewardConfig, choice
from backbone.ops import masked_mean, masked_sum
from backbone.sources import Online, Preferences

DPOMode = choice("DPOMode", "offline online", __name__)

# backbone keys that DPO never reads, by config group: its beta is its own (no KL penalty, no controller)
# and its labels are the data's or the reward model's raw scores (no shaped reward)
UNREAD = {
    "kl": (KLConfig, "DPO's KL coefficient is algorithm.beta, fixed; it adds no KL penalty to a reward"),
    "reward": (RewardConfig, "DPO reads no shaped reward (pairs are labelled by the data or by raw scores)"),
}
# read all the same: how the reward model pools its score (online labels, and every evaluation's proxy reward)
READ = {"reward.pooling"}


def sequence_logprobs(logprobs: Tensor, mask: Tensor) -> Tensor:
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the response's tokens, pads excluded. [B, T] -> [B]"""
    return masked_sum(logprobs, mask.to(logprobs.dtype), dim=1)


def pair_rows(group: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of each pair, (chosen [N], rejected [N]): rows sorted by group, chosen first in each."""
    order = torch.argsort(group * 2 + (~chosen).long(), stable=True)  # [B]
    return order[0::2], order[1::2]


def check_pairs(group: Tensor, chosen: Tensor | None) -> None:
    """Every group is one preference pair: one chosen row and one rejected row."""
    if chosen is None:
        raise ValueError("DPO trains on preference pairs: the rollouts mark no chosen rows")
    yw, yl = pair_rows(group, chosen)
    if len(yw) != len(yl) or not (
        torch.equal(group[yw], group[yl]) and chosen[yw].all() and not chosen[yl].any()
    ):
        raise ValueError("DPO trains on preference pairs: each group must be a chosen row and a rejected row")


def dpo_loss(margins: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) per pair, from beta * h. [N] -> [N]"""
    return -(1 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)


@dataclass
class DPOConfig(AlgorithmConfig):
    """DPO: the policy's implicit reward fitted to preference pairs, offline or online."""

    _target_: str = "algorithms.dpo.DPO"
    name: str = "dpo"
    # on toy_reviews 1e-3 drifts far from the reference (KL 5-20 in 30 iterations) while gold falls
    lr: float = 3e-4
    # one pass over each batch, as DPO is trained; minibatches of rows (a pair is two rows)
    ppo_epochs: int = 1
    minibatch_size: int = 16
    # the KL coefficient of the objective DPO solves. TRL's default 0.1 lets offline DPO on toy_reviews
    # drift (seed 1, 60 iterations: KL 8.7, gold +0.25, against KL 3.5, gold +0.79 at 0.3); online
    # learns alike at either
    beta: float = 0.3
    # offline: the task's train preference pairs; online: two samples per prompt, labelled by the reward model
    mode: DPOMode = DPOMode.offline
    # conservative DPO: the probability that a label is flipped, in [0, 0.5); 0 is the paper's loss
    label_smoothing: float = 0.0


@register(DPOConfig)
class DPO(Algorithm):
    def __init__(self, **values):
        super().__init__(**values)
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def source(self) -> Online | Preferences:
        return Online(2, label_pairs=True) if self.mode == "online" else Preferences()

    def check(self, cfg) -> list[str]:
        problems = []
        for group, (schema, why) in UNREAD.items():
            for f in fields(schema):
                key = f"{group}.{f.name}"
                value = OmegaConf.select(cfg, key)
                if key not in READ and value != f.default:
                    problems.append(f"{key}={value}: {why}")
        return problems

    def prepare(self, rollouts: Rollouts) -> Batch:
        check_pairs(rollouts.group, rollouts.chosen)
        ref_logps = sequence_logprobs(rollouts.ref_logprobs, rollouts.response_mask)  # [B] log pi_ref(y|x)
        counts = torch.ones_like(rollouts.chosen)  # [B] whether the row's pair enters the loss
        stats = {}
        if self.mode == "online":  # the reward model's labels: a tie is no preference
            yw, yl = pair_rows(rollouts.group, rollouts.chosen)  # [N], [N]
            tied = rollouts.scores[yw] == rollouts.scores[yl]  # [N]
            counts[yw], counts[yl] = ~tied, ~tied
            stats["tie_fraction"] = tied.float().mean()
        return Batch(rollouts, {"ref_logps": ref_logps, "counts": counts}, stats)

    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rollouts = batch.rollouts
        out = policy.forward(rollouts)
        mask = rollouts.response_mask.to(out.logprobs.dtype)  # [B, T]
        logps = sequence_logprobs(out.logprobs, mask)  # [B] log pi(y|x)
        rewards = self.beta * (logps - batch["ref_logps"])  # [B] r_hat(x, y)
        yw, yl = pair_rows(rollouts.group, rollouts.chosen)  # [N] chosen rows, [N] rejected rows
        margins = rewards[yw] - rewards[yl]  # [N] beta * h
        counts = batch["counts"][yw].to(margins.dtype)  # [N] 1 where the pair counts, 0 on a tie
        loss = masked_mean(dpo_loss(margins, self.label_smoothing), counts)
        per_pair = {  # [N] each, averaged below over the pairs that count
            "rewards/chosen": rewards[yw],
            "rewards/rejected": rewards[yl],
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).to(margins.dtype),
            "logps/chosen": logps[yw],
            "logps/rejected": logps[yl],
        }
        stats = {key: masked_mean(value.detach(), counts) for key, value in per_pair.items()}
        stats["entropy"] = masked_mean(out.entropy.detach(), mask)
        return loss, stats
