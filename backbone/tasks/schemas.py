"""Row schemas: how a raw row of each preference dataset reads as (prompt, chosen, rejected).

One small adapter per schema maps the values of the schema's columns to a ``Pair`` or to the
reason the row is unusable (a string of ``SKIP_REASONS``); ``check_pair`` then applies the
checks every schema shares. Datasets whose rows are a bare question and two answers (SHP,
StackExchange) are put in the Anthropic dialogue format that hh-rlhf and rm-static already
use, so that a blend of them reads as one kind of text:

    prompt   "\\n\\nHuman: <question>\\n\\nAssistant:"
    response " <answer>"          (the leading space is how the transcript continues)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"

Pair = tuple[str, str, str]  # (prompt, chosen, rejected)

# why a row is skipped: first what an adapter finds, then what check_pair finds, in check order
SKIP_REASONS = (
    "non_utf8",  # a text field's bytes are not valid UTF-8
    "non_string",  # a text field is missing (null) or not a string
    "no_assistant_turn",  # hh_rlhf: the chosen transcript has no "\n\nAssistant:"
    "prompt_mismatch",  # hh_rlhf: chosen and rejected do not share the dialogue before the last reply
    "bad_label",  # shp: labels is neither 0 nor 1
    "empty_prompt",
    "empty_response",
    "chosen_equals_rejected",
)


@dataclass(frozen=True)
class RowSchema:
    """The columns a schema reads (the adapter gets their values in this order) and its adapter."""

    columns: tuple[str, ...]
    adapt: Callable[..., Pair | str]


def _texts(*values: Any) -> bool:
    return all(isinstance(value, str) for value in values)


def given(prompt: Any, chosen: Any, rejected: Any) -> Pair | str:
    """Columns that already hold the prompt and the two responses (rm-static, local files)."""
    return (prompt, chosen, rejected) if _texts(prompt, chosen, rejected) else "non_string"


def hh_rlhf(chosen: Any, rejected: Any) -> Pair | str:
    """Two full transcripts: the prompt is everything up to and including the last "\\n\\nAssistant:"
    of the chosen one, and the rejected one must start with the same prompt."""
    if not _texts(chosen, rejected):
        return "non_string"
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return "no_assistant_turn"
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        return "prompt_mismatch"
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def dialogue(question: Any, chosen: Any, rejected: Any) -> Pair | str:
    """A question and two answers, put in the dialogue format (module docstring)."""
    if not _texts(question, chosen, rejected):
        return "non_string"
    return f"{HUMAN}{question}{ASSISTANT}", f" {chosen}", f" {rejected}"


def shp(history: Any, ref_a: Any, ref_b: Any, label: Any) -> Pair | str:
    """SHP: ``labels`` is 1 when human_ref_A is preferred, 0 when human_ref_B is."""
    if label not in (0, 1):
        return "bad_label"
    return dialogue(history, ref_a, ref_b) if label == 1 else dialogue(history, ref_b, ref_a)


SCHEMAS = {
    # preference is the configurable one: its columns are the task's prompt/chosen/rejected keys
    "rm_static": RowSchema(("prompt", "chosen", "rejected"), given),
    "hh_rlhf": RowSchema(("chosen", "rejected"), hh_rlhf),
    "shp": RowSchema(("history", "human_ref_A", "human_ref_B", "labels"), shp),
    "stack_exchange_paired": RowSchema(("question", "response_j", "response_k"), dialogue),
}


def row_schema(name: str, prompt_key: str, chosen_key: str, rejected_key: str) -> RowSchema:
    """The schema called ``name``; ``preference`` reads the three given columns as they are."""
    if name == "preference":
        return RowSchema((prompt_key, chosen_key, rejected_key), given)
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}; expected 'preference' or one of {sorted(SCHEMAS)}")
    return SCHEMAS[name]


def check_pair(pair: Pair) -> str | None:
    """The checks every schema shares: non-empty texts and two different responses."""
    prompt, chosen, rejected = pair
    if not prompt.strip():
        return "empty_prompt"
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen.strip() == rejected.strip():
        return "chosen_equals_rejected"
    return None
