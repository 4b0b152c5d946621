"""Every random number generator a run draws from: seeded together, saved and restored together.

The saved state holds only tensors, numbers and lists, so a checkpoint loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    bit_generator, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [bit_generator, key.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    bit_generator, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((bit_generator, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# the stages before RL, by the config node that holds each one's seed
STAGE_SEEDS = {"task": "task.seed", "sft": "sft.seed", "reward_model": "reward_model.seed"}


def apply_seed_scope(cfg: DictConfig) -> DictConfig:
    """Under ``seed_scope=pipeline``, ``seed`` becomes the seed of every stage not in ``pinned_stages``.

    Done on the config itself, before anything hashes it, so the resolved config a run records says
    which seeds each stage used, and the artifact keys (which hold the stage configs) follow: each
    seed builds its own SFT and reward model once, and every arm of that seed shares them.
    """
    if cfg.seed_scope == "rl" and cfg.pinned_stages:
        raise ValueError(
            "pinned_stages pins stages under seed_scope=pipeline; under rl every stage keeps its own seed"
        )
    if cfg.seed_scope == "pipeline":
        for stage, key in STAGE_SEEDS.items():
            if stage not in cfg.pinned_stages and OmegaConf.select(cfg, key) is not None:
                OmegaConf.update(cfg, key, cfg.seed)
    return cfg
