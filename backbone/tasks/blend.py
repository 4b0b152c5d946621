"""Blending datasets by weight and splitting their rows between the stages (DeepSpeed-Chat's data_split).

DeepSpeed-Chat gives each training phase its own share of every dataset (``--data_split 2,4,4``:
20% of the rows for SFT, 40% for the reward model, 40% for RL prompts), so the reward model is
never scored on pairs the policy was fine-tuned on and RL prompts are new to both. Here:

1. Weights: source i gets the share w_i / sum(w) of the mixture. The mixture is the largest one
   with those proportions that repeats no row, so the source with the fewest rows per unit of
   weight is used whole and the others are subsampled (seeded).
2. Stage split: each source's rows are cut into disjoint portions by ``stage_split``
   ([sft, reward, rl] shares, normalised), after a seeded shuffle. Without a stage split every
   stage reads the same rows (the rows of a small dataset reused for everything).

Every draw is seeded by (seed, split, source), so a split depends on nothing but those and the
rows; a portion keeps its rows in dataset order, and the sources follow one another.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import TypeVar

STAGES = ("sft", "reward", "rl")

Row = TypeVar("Row")


def check_stage_split(stage_split: Sequence[float] | None) -> None:
    if stage_split is None:
        return
    if len(stage_split) != len(STAGES) or any(share <= 0 for share in stage_split):
        raise ValueError(
            f"stage_split={list(stage_split)}: expected {len(STAGES)} positive shares for {STAGES}"
        )


def check_weights(weights: Mapping[str, float]) -> None:
    bad = {name: w for name, w in weights.items() if not w > 0}
    if bad:
        raise ValueError(f"source weights must be > 0, got {bad}")


def blend_counts(sizes: Mapping[str, int], weights: Mapping[str, float]) -> dict[str, int]:
    """Rows to take from each source: the largest mixture with shares weights / sum(weights)."""
    total = sum(weights.values())
    shares = {name: weights[name] / total for name in sizes}
    mixture = min(sizes[name] / share for name, share in shares.items())
    return {name: min(sizes[name], round(share * mixture)) for name, share in shares.items()}


def portions(indices: list[int], stage_split: Sequence[float]) -> list[list[int]]:
    """``indices`` cut into consecutive parts of the given shares; sizes are rounded cumulatively,
    so they add up to len(indices) and each is within one row of its share."""
    total, cumulative, bounds = sum(stage_split), 0.0, [0]
    for share in stage_split:
        cumulative += share
        bounds.append(round(len(indices) * cumulative / total))
    return [indices[start:end] for start, end in pairwise(bounds)]


def blend_and_split(
    rows: Mapping[str, list[Row]],
    weights: Mapping[str, float],
    stage_split: Sequence[float] | None,
    seed: str,
) -> dict[str, list[Row]]:
    """Stage name -> that stage's rows, from every source (module docstring)."""
    check_stage_split(stage_split)
    check_weights(weights)
    counts = blend_counts({name: len(source_rows) for name, source_rows in rows.items()}, weights)
    stages: dict[str, list[Row]] = {stage: [] for stage in STAGES}
    for name, source_rows in rows.items():
        order = list(range(len(source_rows)))
        random.Random(f"{seed}:{name}").shuffle(order)
        taken = order[: counts[name]]
        parts = portions(taken, stage_split) if stage_split is not None else [taken] * len(STAGES)
        for stage, part in zip(STAGES, parts):
            stages[stage] += [source_rows[i] for i in sorted(part)]
    return stages
