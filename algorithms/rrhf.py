"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al., 2023).

For each prompt, k candidates y_1..y_k are sampled from the policy (the trainer samples them) and
scored by the reward model (r_i). The policy is taught to score them in the reward model's order:

    p_i    = sum_t log pi(y_{i,t}) / |y_i| ** length_penalty      length-normalised score, EOS included
    L_rank = sum_{i, j: r_i < r_j} max(0, p_i - p_j)              a worse candidate must not score higher
    L_sft  = -(1 / |y_i*|) sum_t log pi(y_{i*,t}),  i* = argmax_i r_i
    L      = rank_weight * L_rank + sft_weight * L_sft

L is computed per prompt and averaged over the prompts (groups) of the minibatch, so a minibatch's
loss does not grow with how many prompts it packs. No critic, no importance ratio, no KL term.

``mode=online`` samples fresh candidates from the current policy each iteration; ``mode=offline`` is
the paper's setting: candidates for the whole prompt set are sampled once from the initial policy.
``include_chosen`` adds the task's chosen response to each prompt's candidates, as the paper ranks
the dataset's responses beside the sampled ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.base import Algorithm, Policy
from backbone.batch import Batch, Rollouts
from backbone.ops import masked_mean, masked_sum

MODES = ("online", "offline")


def length_normalised_logprob(logprobs: Tensor, mask: Tensor, length_penalty: float) -> Tensor:
    """p_i = sum_t logp_{i,t} / len_i ** length_penalty over valid tokens; 0 if empty. [B, T] -> [B]"""
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(dim=1).clamp(min=1)  # [B]
    return masked_sum(logprobs, mask, dim=1) / lengths**length_penalty


def _ordered_pairs(rewards: Tensor, group: Tensor) -> Tensor:
    """[B, B] bool, (i, j) true when i and j answer the same prompt and r_i < r_j (ties are unordered)."""
    return (group[:, None] == group[None, :]) & (rewards[:, None] < rewards[None, :])


def _best_candidates(rewards: Tensor, group: Tensor) -> Tensor:
    """[B] bool, the highest-rewarded candidate of each group (on a tie, the first in batch order)."""
    _, index = torch.unique(group, return_inverse=True)  # [B] group as 0..G-1
    num_groups, rows = int(index.max()) + 1, torch.arange(len(rewards), device=rewards.device)
    best_reward = rewards.new_full((num_groups,), -torch.inf).scatter_reduce(0, index, rewards, "amax")
    is_max = rewards == best_reward[index]  # [B]
    candidates = torch.where(is_max, rows, len(rewards))  # [B] row number of the group's maxima
    first = index.new_full((num_groups,), len(rewards)).scatter_reduce(0, index, candidates, "amin")  # [G]
    return rows == first[index]


def rank_loss(scores: Tensor, rewards: Tensor, group: Tensor) -> Tensor:
    """L_rank = sum_{r_i < r_j, same group} max(0, p_i - p_j), averaged over groups. [B] -> scalar"""
    hinge = torch.relu(scores[:, None] - scores[None, :])  # [B, B] max(0, p_i - p_j)
    return (hinge * _ordered_pairs(rewards, group)).sum() / torch.unique(group).numel()


def best_candidate_sft_loss(logprobs: Tensor, mask: Tensor, rewards: Tensor, group: Tensor) -> Tensor:
    """L_sft = -mean over valid tokens of log pi(y_{i*,t}), i* the best of its group, averaged over groups.

    The paper writes the sum over tokens and the repo takes the mean over the padded length (a scaled
    variant); the mean over valid tokens is the usual token-level cross-entropy, on the same per-token
    scale as p_i with length_penalty=1 and independent of padding.
    """
    nll = -masked_mean(logprobs, mask.to(logprobs.dtype), dim=1)  # [B]
    return nll[_best_candidates(rewards, group)].mean()


class RRHF(Algorithm):
    def __init__(
        self,
        name: str,
        lr: float,
        ppo_epochs: int,
        minibatch_size: int,
        samples_per_prompt: int = 4,
        rank_weight: float = 0.1,
        sft_weight: float = 1.0,
        length_penalty: float = 1.0,
        mode: str = "online",
        include_chosen: bool = False,
    ):
        super().__init__(name, lr, ppo_epochs, minibatch_size)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if samples_per_prompt < 2:
            raise ValueError(
                f"RRHF ranks candidates: samples_per_prompt must be >= 2, got {samples_per_prompt}"
            )
        self.samples_per_prompt = samples_per_prompt
        self.offline = mode == "offline"
        self.include_chosen = include_chosen
        self.rank_weight = rank_weight
        self.sft_weight = sft_weight
        self.length_penalty = length_penalty

    def prepare(self, rollouts: Rollouts) -> Batch:
        # the targets are the rewards and groups themselves; ranking happens in the loss, per group
        return Batch(rollouts, {})

    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rollouts = batch.rollouts
        out = policy.forward(rollouts, values=self.needs_critic)
        mask = rollouts.response_mask.to(out.logprobs.dtype)  # [B, T]
        rewards, group = rollouts.rewards, rollouts.group  # [B], [B]
        scores = length_normalised_logprob(out.logprobs, mask, self.length_penalty)  # [B] p_i
        l_rank = rank_loss(scores, rewards, group)
        l_sft = best_candidate_sft_loss(out.logprobs, mask, rewards, group)
        loss = self.rank_weight * l_rank + self.sft_weight * l_sft
        pairs = _ordered_pairs(rewards, group)  # [B, B]
        violated = pairs & (scores[:, None] > scores[None, :])  # worse candidate scored strictly higher
        stats = {
            "rank_loss": l_rank.detach(),
            "sft_loss": l_sft.detach(),
            "entropy": masked_mean(out.entropy.detach(), mask),
            "rank_violations": violated.sum() / pairs.sum().clamp(min=1),
            "best_reward_mean": rewards[_best_candidates(rewards, group)].mean(),
        }
        return loss, stats
