"""Data sources: where the trainer's batches come from, declared by each algorithm.

The trainer asks its source for one ``Rollouts`` batch per iteration and knows nothing else about
where the batch comes from. An algorithm declares a source with a spec (``Algorithm.source``):

    Online(n)          n fresh samples per prompt from the current policy, scored (PPO, GRPO, RLOO,
                       RRHF online); with_chosen: the task's chosen response joins each prompt's group,
                       teacher-forced (RRHF ranks the data beside its samples); label_pairs: n = 2 and
                       the reward model's preferred sample of each pair is marked chosen (online DPO)
    Frozen(n)          the same, sampled once from the initial policy for the whole budget (RRHF offline)
    Preferences()      (prompt, chosen, rejected) pairs from the task's train preference split, the
                       pairs the reward model trained on, teacher-forced (offline DPO)

Each yields the same ``Rollouts`` (log-probs of the sampling policy, reference log-probs, scores,
``group`` = the prompt or pair a row belongs to, ``sampled`` and ``chosen`` where they apply), and
declares its budget unit: ``samples`` generated, or preference ``pairs`` seen. An iteration consumes
``rollout.samples_per_iteration`` units of either, so equal iterations are equal budgets in the
source's unit (the history's ``budget`` column; ``samples`` counts generated responses only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from backbone import distributed
from backbone.batch import Rollouts
from backbone.progress import progress


@dataclass(frozen=True)
class Online:
    samples_per_prompt: int
    with_chosen: bool = False
    label_pairs: bool = False
    unit = "samples"

    @property
    def group_size(self) -> int:
        return self.samples_per_prompt + self.with_chosen


@dataclass(frozen=True)
class Frozen(Online):
    pass


@dataclass(frozen=True)
class Preferences:
    unit = "pairs"
    samples_per_prompt = 0  # nothing is generated
    group_size = 2  # chosen, rejected


SourceSpec = Online | Preferences


class Stream:
    """An endless, seeded stream over ``items``, reshuffled every pass (its position is resumable)."""

    def __init__(self, items: list, seed: int, what: str):
        if not items:
            raise ValueError(f"the task has no {what}")
        self.items = items
        self.seed = seed
        self.position = 0

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.position, len(self.items))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
            out.append(self.items[order[index]])
            self.position += 1
        return out


def groups_per_iteration(spec: SourceSpec, units_per_iteration: int) -> int:
    """Prompts (or pairs) per iteration, over all ranks: units / samples_per_prompt, or the pairs."""
    if isinstance(spec, Preferences):
        return units_per_iteration
    n = spec.samples_per_prompt
    if n < 1 or units_per_iteration % n:
        raise ValueError(
            f"rollout.samples_per_iteration={units_per_iteration} is not a multiple of "
            f"algorithm.samples_per_prompt={n}"
        )
    return units_per_iteration // n


def minibatches_per_epoch(groups: int, group_size: int, minibatch_size: int) -> int:
    """How many minibatches ``Batch.minibatches`` packs ``groups`` equal groups into: whole groups until
    a minibatch holds at least ``minibatch_size`` rows, the rest in a last one."""
    return math.ceil(groups / math.ceil(minibatch_size / group_size))


class DataSource:
    """Fresh samples from the current policy every iteration (``Online``)."""

    def __init__(
        self, spec: SourceSpec, collector, task, units_per_iteration: int, seed: int, with_values: bool
    ):
        self.spec = spec
        self.collector = collector
        self.task = task
        self.with_values = with_values
        self.unit = spec.unit
        self.units_per_iteration = units_per_iteration
        self.groups = groups_per_iteration(spec, units_per_iteration)  # over all ranks
        self.stream = Stream(self.items(), seed, self.what)
        self.samples = self.tokens = 0  # responses generated, and their tokens, over all ranks
        if isinstance(spec, Online) and spec.with_chosen:
            self.chosen(sorted(set(self.stream.items)))  # every RL prompt has one, or fail now
        if isinstance(spec, Online) and spec.label_pairs and spec.samples_per_prompt != 2:
            raise ValueError(f"label_pairs needs samples_per_prompt=2, got {spec.samples_per_prompt}")

    what = "RL prompts"

    def items(self) -> list:
        return self.task.rl_prompts()

    @property
    def groups_per_rank(self) -> int:
        return self.groups // distributed.world_size()

    def updates_per_epoch(self, minibatch_size: int) -> int:
        """Optimiser steps per epoch over one iteration's batch, on each rank."""
        return minibatches_per_epoch(self.groups_per_rank, self.spec.group_size, minibatch_size)

    def start(self, iterations: int) -> None:
        """Called once before the first iteration (not on resume)."""

    def next(self, iteration: int, kl_coef: float) -> Rollouts:
        """The batch of ``iteration`` (1-based); under several ranks, this rank's share."""
        return self.sample(kl_coef)

    def sample(self, kl_coef: float, group_offset: int = 0) -> Rollouts:
        spec = self.spec
        prompts = self.stream.take(self.groups)[distributed.rank() :: distributed.world_size()]
        rollouts = self.collector.collect(
            prompts,
            spec.samples_per_prompt,
            kl_coef,
            self.with_values,
            group_offset=group_offset,
            given_responses=self.chosen(prompts) if spec.with_chosen else None,
        )
        if spec.label_pairs:
            rollouts.chosen = preferred_of_pairs(rollouts.scores)
        self.count(rollouts)
        return rollouts

    def count(self, rollouts: Rollouts) -> None:
        """Generated responses and tokens (responses taken from data are not generated), all ranks'."""
        lengths = rollouts.response_lengths
        if rollouts.sampled is not None:
            lengths = lengths[rollouts.sampled]
        self.samples += int(distributed.sum_over_ranks(len(lengths)))
        self.tokens += int(distributed.sum_over_ranks(int(lengths.sum())))

    def chosen(self, prompts: list[str]) -> list[str]:
        """The task's chosen response to each prompt (``with_chosen``)."""
        chosen = [self.task.chosen_response(p) for p in prompts]
        missing = [p for p, c in zip(prompts, chosen) if c is None]
        if missing:
            raise ValueError(
                f"the algorithm ranks the task's chosen responses: task {self.task.name!r} has none for "
                f"prompt {missing[0]!r} (and {len(missing) - 1} more of this batch)"
            )
        return chosen

    def state_dict(self) -> dict:
        return {"position": self.stream.position, "samples": self.samples, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.stream.position, self.samples, self.tokens = state["position"], state["samples"], state["tokens"]


def preferred_of_pairs(scores: torch.Tensor) -> torch.Tensor:
    """[B] bool, the higher-scored row of each consecutive pair (rows 2k, 2k + 1); the first on a tie."""
    pairs = scores.view(-1, 2)  # [B / 2, 2]
    first = pairs[:, 0] >= pairs[:, 1]  # [B / 2]
    return torch.stack([first, ~first], dim=1).flatten()


class FrozenBuffer(DataSource):
    """The whole budget sampled up front from the initial policy (``Frozen``); group ids stay unique
    across the buffer, which the checkpoint keeps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer: list[Rollouts] = []

    def start(self, iterations: int) -> None:
        for i in progress(range(iterations), desc="offline rollouts"):
            self.buffer.append(self.sample(kl_coef=0.0, group_offset=i * self.groups))

    def next(self, iteration: int, kl_coef: float) -> Rollouts:
        return self.buffer[iteration - 1]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": [rollouts.state_dict() for rollouts in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer = [Rollouts.from_state_dict(r, self.collector.device) for r in state["buffer"]]


class PreferencePairs(DataSource):
    """The task's train preference pairs (``Preferences``), a seeded stream reshuffled every pass; each
    pair is two teacher-forced rows, chosen first, of one group. Nothing is generated."""

    what = "train preference pairs"

    def items(self) -> list:
        return self.task.preference_pairs("train")

    def sample(self, kl_coef: float, group_offset: int = 0) -> Rollouts:
        pairs = self.stream.take(self.groups)[distributed.rank() :: distributed.world_size()]
        prompts = [pair["prompt"] for pair in pairs for _ in range(2)]
        responses = [response for pair in pairs for response in (pair["chosen"], pair["rejected"])]
        # the data's responses are not the policy's: they stay out of the running reward statistics
        rollouts = self.collector.collect_given(
            prompts, responses, kl_coef, self.with_values, update_stats=False
        )
        rollouts.chosen = torch.arange(len(rollouts), device=rollouts.group.device) % 2 == 0
        return rollouts


SOURCES = {Online: DataSource, Frozen: FrozenBuffer, Preferences: PreferencePairs}


def build_source(spec: SourceSpec, collector, task, units_per_iteration: int, seed: int, with_values: bool):
    return SOURCES[type(spec)](spec, collector, task, units_per_iteration, seed, with_values)
