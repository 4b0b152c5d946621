"""The ``Task`` interface: where a run's text comes from, and how (if at all) it is truly judged.

A task supplies every stage of the pipeline: demonstrations for SFT, preference pairs for the
reward model, a stream of prompts for RL, held-out prompts for evaluation, the texts a local
tokenizer is trained on, and, when it knows one, a gold reward the proxy reward model can be
checked against. A task may also have a pretraining corpus: plain texts that are not the RL
objective, which PTX mixes into the RL loss (``ptx.source=pretrain``, backbone/ptx.py).

Text conventions: a model sees the prompt's tokens, then the response's tokens, then EOS;
prompt and response are tokenised separately. Responses produced by a policy come back
decoded as space-joined words with special tokens stripped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

SPLITS = ("train", "eval")


def check_split(split: str) -> None:
    """Fail early on a split name the interface does not know."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


class Task(ABC):
    name: str
    # True when gold_reward returns numbers
    has_gold: bool

    @abstractmethod
    def sft_examples(self, split: str) -> list[dict]:
        """Demonstrations ``{"prompt", "response"}`` of ``split`` ("train" or "eval")."""

    @abstractmethod
    def preference_pairs(self, split: str) -> list[dict]:
        """Pairs ``{"prompt", "chosen", "rejected"}`` of ``split`` ("train" or "eval")."""

    @abstractmethod
    def rl_prompts(self) -> list[str]:
        """Prompts for the RL stage (they may repeat: a stream)."""

    @abstractmethod
    def eval_prompts(self) -> list[str]:
        """Held-out prompts for evaluation; none of them is in ``rl_prompts()``."""

    @abstractmethod
    def gold_reward(self, prompts: list[str], responses: list[str]) -> list[float] | None:
        """The true score of each (prompt, response), or None when the task has no gold."""

    @abstractmethod
    def corpus(self) -> list[str]:
        """Texts (prompts and responses) to train a tokenizer on."""

    def pretrain_texts(self, split: str) -> list[str]:
        """Texts of the pretraining corpus's ``split`` ("train" or "eval", disjoint); empty when the
        task has none. Each is one document, scored on every token (backbone/ptx.py)."""
        check_split(split)
        return []

    def data_stats(self) -> dict[str, int]:
        """Counts about the task's data for the run summary (rows per stage, rows skipped and why)."""
        return {}

    def chosen_response(self, prompt: str) -> str | None:
        """A preferred response to ``prompt`` from the task's train preference pairs (the first
        pair of that prompt), or None; RRHF can rank it beside the policy's samples."""
        if not hasattr(self, "_chosen_by_prompt"):
            self._chosen_by_prompt: dict[str, str] = {}
            for pair in self.preference_pairs("train"):
                self._chosen_by_prompt.setdefault(pair["prompt"], pair["chosen"])
        return self._chosen_by_prompt.get(prompt)
