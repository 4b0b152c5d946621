"""The Algorithm interface: the only thing that differs between runs of the sandbox.

An algorithm declares where its batches come from (``source``: a data source of
backbone/sources.py), turns each batch of ``Rollouts`` into targets (``prepare``, no gradient)
and a loss (``loss``); the trainer owns epochs, minibatches, optimiser steps, logging and
evaluation. Its config schema (a dataclass extending ``AlgorithmConfig``) lives in its own
module beside it and holds its defaults, once: ``@register`` makes it the Hydra option
``algorithm=<name>`` (backbone/config.py stores every registered schema).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

from omegaconf import MISSING, OmegaConf
from torch import Tensor

from backbone.batch import Batch, PolicyOutput, Rollouts
from backbone.sources import Online, SourceSpec

__all__ = [
    "REGISTRY",
    "Algorithm",
    "AlgorithmConfig",
    "Batch",
    "Policy",
    "PolicyOutput",
    "Rollouts",
    "register",
]


@dataclass
class AlgorithmConfig:
    """What every algorithm has; an algorithm's schema extends it with its own knobs."""

    _target_: str = MISSING
    name: str = MISSING
    lr: float = 1e-4
    # passes over each batch, and responses per gradient step (whole prompt groups are packed)
    ppo_epochs: int = 4
    minibatch_size: int = 16


class Policy(Protocol):
    """What an algorithm may ask of the trainable models (the backbone's policy stack)."""

    def forward(self, rollouts: Rollouts, values: bool = False) -> PolicyOutput: ...


class Algorithm(ABC):
    #: the schema of its config, with its defaults (set by ``register``)
    Config: ClassVar[type[AlgorithmConfig]]
    #: whether the backbone must build a critic and collect its values
    needs_critic: bool = False
    #: the critic's values it reads: ``token``, V of the state before each response token [B, T];
    #: ``sequence``, one value per sequence [B] (coati's critic: its per-position values averaged)
    values_per: str = "token"

    def __init__(self, **values):
        """Keyword arguments are the keys of ``Config`` (Hydra passes the composed node); the ones not
        given take the schema's defaults, so defaults are written once, in the schema."""
        self.cfg = self.Config(**values)
        OmegaConf.structured(self.cfg)  # types and closed choices checked as at composition
        for f in fields(self.cfg):
            if not f.name.startswith("_"):
                setattr(self, f.name, getattr(self.cfg, f.name))

    @property
    def source(self) -> SourceSpec:
        """Where its batches come from; by default one fresh sample per prompt from the current policy."""
        return Online(samples_per_prompt=1)

    def check(self, cfg) -> list[str]:
        """Problems of the run config ``cfg`` that only this algorithm knows of (cross-key rules a schema
        cannot express), each naming its keys; checked with the backbone's own before any work."""
        return []

    @abstractmethod
    def prepare(self, rollouts: Rollouts) -> Batch:
        """Targets (advantages, returns, ranks) from a rollout batch, and statistics of the whole
        batch in ``Batch.stats``; called under no_grad."""

    @abstractmethod
    def loss(self, policy: Policy, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss of one minibatch and its statistics (detached 0-d tensors, read once
        per update so that no statistic stalls a GPU step), logged under ``train/``."""


#: algorithm name -> class, filled by ``register`` as the modules of this package are imported
REGISTRY: dict[str, type[Algorithm]] = {}


def register(config: type[AlgorithmConfig]):
    """Class decorator: ``config`` (its ``name`` and ``_target_`` defaults naming this class) is the
    algorithm's schema, stored as the Hydra option ``algorithm=<name>``."""

    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        name, target = config.name, f"{cls.__module__}.{cls.__qualname__}"
        if config._target_ != target:
            raise TypeError(f"{config.__name__}._target_ = {config._target_!r}, but the class is {target}")
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise TypeError(f"two algorithms are named {name!r}: {REGISTRY[name].__qualname__} and {target}")
        cls.Config = config
        REGISTRY[name] = cls
        return cls

    return decorate
