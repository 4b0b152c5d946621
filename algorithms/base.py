"""The Algorithm interface: the only thing that differs between runs of the sandbox.

The backbone collects ``Rollouts`` (samples, log-probs, reference log-probs, values,
rewards), the algorithm turns them into targets (``prepare``, no gradient) and a loss
(``loss``); the trainer owns epochs, minibatches, optimiser steps, logging and evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from torch import Tensor

from backbone.batch import Batch, PolicyOutput, Rollouts

__all__ = ["Algorithm", "Batch", "Policy", "PolicyOutput", "Rollouts"]


class Policy(Protocol):
    """What an algorithm may ask of the trainable models (the backbone's policy stack)."""

    def forward(self, rollouts: Rollouts, values: bool = False) -> PolicyOutput: ...


class Algorithm(ABC):
    #: responses sampled per prompt: 1 for multi-step PPO, n for group baselines and ranking
    samples_per_prompt: int = 1
    #: whether the backbone must build a critic and collect its values
    needs_critic: bool = False
    #: the critic's values it reads: ``token``, V of the state before each response token [B, T];
    #: ``sequence``, one value per sequence [B] (coati's critic: its per-position values averaged)
    values_per: str = "token"
    #: offline algorithms get one rollout of the whole prompt set from the initial policy
    offline: bool = False
    #: the task's chosen response to each prompt joins the policy's samples (teacher-forced)
    include_chosen: bool = False

    def __init__(self, name: str, lr: float, ppo_epochs: int, minibatch_size: int):
        self.name = name
        self.lr = lr
        self.ppo_epochs = ppo_epochs
        self.minibatch_size = minibatch_size

    @abstractmethod
    def prepare(self, rollouts: Rollouts) -> Batch:
        """Targets (advantages, returns, ranks) from a rollout batch, and statistics of the whole
        batch in ``Batch.stats``; called under no_grad."""

    @abstractmethod
    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss of one minibatch and its statistics (detached 0-d tensors, read once
        per update so that no statistic stalls a GPU step), logged under ``train/``."""
