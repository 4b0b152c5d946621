"""A task read from a preference dataset: rows of (prompt, chosen, rejected), no gold reward.

The dataset is loaded with ``datasets.load_dataset(path, data_files=data_files)`` and checked
when the task is built, before any training: missing splits or columns fail with a message
naming what is missing and what is there, and unusable rows are skipped and counted.

- SFT demonstrations are (prompt, chosen); preference pairs are the rows.
- RL prompts are the unique prompts of the train split; eval prompts are ``n_eval_prompts``
  unique prompts of the eval split (seeded shuffle) that are not train prompts, so evaluation
  stays held out even where a dataset repeats prompts across its splits.
- The tokenizer corpus is every prompt, chosen and rejected text of both splits.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import datasets
from omegaconf import DictConfig, ListConfig, OmegaConf

from backbone.tasks.base import Task, check_split

logger = logging.getLogger(__name__)

# why a row is skipped, in the order the checks run
SKIP_REASONS = ("non_string", "empty_prompt", "empty_response", "chosen_equals_rejected")


class PreferenceDatasetTask(Task):
    has_gold = False

    def __init__(
        self,
        path: str,
        name: str = "preferences",
        data_files: Any = None,
        train_split: str = "train",
        eval_split: str = "test",
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        n_eval_prompts: int = 64,
        seed: int = 0,
    ) -> None:
        if isinstance(data_files, DictConfig | ListConfig):
            # from Hydra: datasets only recognises plain dicts and lists
            data_files = OmegaConf.to_container(data_files, resolve=True)
        self.name = name
        self.path = path
        self.data_files = data_files
        self.keys = {"prompt": prompt_key, "chosen": chosen_key, "rejected": rejected_key}
        self.split_names = {"train": train_split, "eval": eval_split}
        # "<dataset split>/<reason>" -> rows skipped
        self.skipped: dict[str, int] = {}

        loaded = datasets.load_dataset(path, data_files=data_files)
        source = f"path={path!r}, data_files={data_files!r}"
        for split in self.split_names.values():
            if split not in loaded:
                raise ValueError(f"split {split!r} not found in {source}; available splits: {list(loaded)}")
            columns = loaded[split].column_names
            for role, key in self.keys.items():
                if key not in columns:
                    raise ValueError(
                        f"column {key!r} ({role}_key) not found in split {split!r} of {source}; "
                        f"available columns: {columns}"
                    )
        rows = {
            split: self._valid_rows(loaded[split], split)
            for split in dict.fromkeys(self.split_names.values())
        }
        self._pairs = {role: rows[split] for role, split in self.split_names.items()}

        self._rl_prompts = list(dict.fromkeys(row["prompt"] for row in self._pairs["train"]))
        train_prompts = set(self._rl_prompts)
        eval_unique = list(dict.fromkeys(row["prompt"] for row in self._pairs["eval"]))
        held_out = [p for p in eval_unique if p not in train_prompts]
        if len(held_out) < len(eval_unique):
            logger.warning(
                "%d of %d unique prompts of split %r are also train prompts; left out of eval prompts",
                len(eval_unique) - len(held_out), len(eval_unique), eval_split,
            )  # fmt: skip
        if not held_out:
            raise ValueError(
                f"split {eval_split!r} of {source} has no prompt that is not also a train prompt"
            )
        random.Random(seed).shuffle(held_out)
        self._eval_prompts = held_out[:n_eval_prompts]

    def _valid_rows(self, dataset: datasets.Dataset, split: str) -> list[dict]:
        """The usable rows of one split as {"prompt", "chosen", "rejected"}; the rest go to ``skipped``."""
        counts = dict.fromkeys(SKIP_REASONS, 0)
        rows = []
        columns = [dataset[key] for key in self.keys.values()]
        for prompt, chosen, rejected in zip(*columns):
            reason = _skip_reason(prompt, chosen, rejected)
            if reason is None:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            else:
                counts[reason] += 1
        self.skipped |= {f"{split}/{reason}": n for reason, n in counts.items()}
        if any(counts.values()):
            logger.warning(
                "split %r: skipped %d of %d rows (%s)",
                split, sum(counts.values()), len(dataset),
                ", ".join(f"{reason}: {n}" for reason, n in counts.items() if n),
            )  # fmt: skip
        if not rows:
            raise ValueError(
                f"split {split!r} of path={self.path!r}, data_files={self.data_files!r} has no valid rows "
                f"(of {len(dataset)}; skipped: {counts})"
            )
        return rows

    # ------------------------------------------------------------------ Task interface

    def sft_examples(self, split: str) -> list[dict]:
        check_split(split)
        return [{"prompt": row["prompt"], "response": row["chosen"]} for row in self._pairs[split]]

    def preference_pairs(self, split: str) -> list[dict]:
        check_split(split)
        return [dict(row) for row in self._pairs[split]]

    def rl_prompts(self) -> list[str]:
        return list(self._rl_prompts)

    def eval_prompts(self) -> list[str]:
        return list(self._eval_prompts)

    def gold_reward(self, prompts: list[str], responses: list[str]) -> None:
        return None

    def corpus(self) -> list[str]:
        return [row[field] for rows in self._pairs.values() for row in rows for field in row]


def _skip_reason(prompt: Any, chosen: Any, rejected: Any) -> str | None:
    if not all(isinstance(text, str) for text in (prompt, chosen, rejected)):
        return "non_string"
    if not prompt.strip():
        return "empty_prompt"
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen.strip() == rejected.strip():
        return "chosen_equals_rejected"
    return None
