"""The two batches that cross the backbone/algorithm boundary.

``Rollouts``: what the backbone collects (rollout.py) and hands to ``Algorithm.prepare``.
``Batch``: what ``prepare`` returns (rollouts plus the algorithm's own targets) and what
the trainer cuts into minibatches for ``Algorithm.loss``.

Layout of one sequence: the prompt is left-padded, the response right-padded after EOS,
so ``input_ids = [pad pad p1 p2 p3 | r1 r2 EOS pad]`` and response token t sits at column
P + t. Every per-token tensor below is over response positions only: ``[B, T]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Rollouts:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] 1 on prompt tokens
    response_ids: Tensor  # [B, T] right-padded
    response_mask: Tensor  # [B, T] 1 on response tokens up to and including EOS
    group: Tensor  # [B] index of the prompt each response answers (samples of a prompt share it)
    logprobs: Tensor  # [B, T] log pi_old(token), the policy that sampled
    ref_logprobs: Tensor  # [B, T] log pi_ref(token)
    kl: Tensor  # [B, T] per-token KL estimate (the configured k1/k2/k3) used for reward shaping, 0 on pads
    scores: Tensor  # [B] reward-model score, raw
    rewards: Tensor  # [B] score after normalisation, clipping and the missing-EOS penalty
    kl_coef: float = 0.0  # the KL controller's beta when these were collected
    values: Tensor | None = None  # critic values, when needed: [B, T], or [B] one per sequence
    kl_exact: Tensor | None = None  # [B, T] KL(pi || pi_ref) summed over the vocabulary, 0 on pads
    gold: Tensor | None = None  # [B] the task's gold reward, when it has one
    # [B] True for the policy's samples, False for responses taken from the data (RRHF's chosen
    # candidates); None: all sampled. Only sampled rows count as generated or enter rollout metrics.
    sampled: Tensor | None = None
    # [B] True on the preferred row of each preference pair (a group of two), False on the other;
    # None outside preference sources (backbone/sources.py)
    chosen: Tensor | None = None
    prompts: list[str] | None = None
    responses: list[str] | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:  # [B, P + T]
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [B, P + T]
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> Tensor:  # [B]
        return self.response_mask.sum(dim=1)

    def state_dict(self) -> dict:
        """Plain fields on the CPU, for a checkpoint (``torch.load(weights_only=True)`` reads them)."""
        return {f.name: _to(getattr(self, f.name), "cpu") for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> Rollouts:
        return cls(**{name: _to(value, device) for name, value in state.items()})

    def select(self, index: Tensor) -> Rollouts:
        """The rows ``index`` of every per-response field."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[index]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in index.tolist()]
            else:
                out[f.name] = value
        return replace(self, **out)


def _to(value, device):
    return value.to(device) if isinstance(value, Tensor) else value


@dataclass
class PolicyOutput:
    """What one forward pass of the trainable models gives an algorithm's loss."""

    logprobs: Tensor  # [B, T] log pi_theta of each response token
    entropy: Tensor  # [B, T] entropy of pi_theta at each response position
    values: Tensor | None = None  # critic values, when asked for: [B, T], or [B] one per sequence


@dataclass
class Batch:
    """Rollouts plus the algorithm's targets (advantages, returns, ...), each ``[B, ...]``."""

    rollouts: Rollouts
    tensors: dict[str, Tensor]
    # statistics of the whole batch (0-d tensors), logged once per update under ``train/``;
    # minibatches do not carry them
    stats: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __len__(self) -> int:
        return len(self.rollouts)

    def select(self, index: Tensor) -> Batch:
        return Batch(self.rollouts.select(index), {k: v[index] for k, v in self.tensors.items()})

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Shuffled minibatches of about ``size`` responses that never split a prompt's group.

        Ranking losses (RRHF) and group baselines need all samples of a prompt together, so
        whole groups are shuffled and packed until a minibatch holds at least ``size`` responses.
        """
        groups = torch.unique(self.rollouts.group)
        order = groups[torch.randperm(len(groups), generator=generator)]
        members = [torch.nonzero(self.rollouts.group == g).flatten() for g in order]
        current: list[Tensor] = []
        count = 0
        for rows in members:
            current.append(rows)
            count += len(rows)
            if count >= size:
                yield self.select(torch.cat(current))
                current, count = [], 0
        if current:
            yield self.select(torch.cat(current))
