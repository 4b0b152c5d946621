"""Tasks read from preference datasets: rows of (prompt, chosen, rejected), no gold reward.

A ``PreferenceSource`` is one dataset, loaded with ``datasets.load_dataset(path, data_files=...,
data_dir=...)`` and read through its row schema (``backbone.tasks.schemas``: hh_rlhf, rm_static,
shp, stack_exchange_paired, or ``preference``, three named columns). It is checked when the task
is built, before any training: missing splits or columns fail with a message naming what is
missing and what is there, and unusable rows are skipped, counted in ``skipped`` and logged.

A ``PreferenceTask`` blends one or more sources and gives each stage its rows
(``backbone.tasks.blend``; with ``stage_split`` the stages' rows are disjoint):

- SFT demonstrations are (prompt, chosen) of the sft rows; preference pairs are the reward rows.
- RL prompts are the unique prompts of the train split's rl rows; eval prompts are
  ``n_eval_prompts`` unique prompts of the eval split's rl rows (seeded shuffle) that are no
  train prompt of any stage, so evaluation stays held out even where a dataset repeats prompts
  across its splits.
- Every prompt is put through ``prompt_template`` (the model's: LLaMA's BOS, say).
- The tokenizer corpus is every prompt, chosen and rejected text the task uses, and the
  pretraining texts.

A pretraining corpus for PTX (``ptx.source=pretrain``) is a ``TextSource``: a text dataset, one
document per row in a ``text`` column (wikitext, say), loaded the same way (``task.pretrain``).

``PreferenceDatasetTask`` is one dataset (``task=hh_rlhf``, ``task=local_preferences``);
``BlendedPreferenceTask`` is several, each with a weight (``task=blend``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.exceptions import DatasetGenerationError
from omegaconf import DictConfig, ListConfig, OmegaConf

from backbone.tasks.base import SPLITS, Task, check_split
from backbone.tasks.blend import blend_and_split
from backbone.tasks.schemas import SKIP_REASONS, check_pair, row_schema

logger = logging.getLogger(__name__)

DEFAULT_KEYS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def _plain(value: Any) -> Any:
    """Hydra's containers as plain dicts and lists: datasets only recognises those."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class PreferenceSource:
    """One preference dataset's usable rows per interface split ("train", "eval")."""

    def __init__(
        self,
        path: str,
        data_files: Any = None,
        data_dir: str | None = None,
        schema: str = "preference",
        train_split: str = "train",
        eval_split: str = "test",
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        max_rows: int | None = None,
    ) -> None:
        data_files = _plain(data_files)
        self.source = f"path={path!r}, data_files={data_files!r}, data_dir={data_dir!r}"
        keys = {"prompt": prompt_key, "chosen": chosen_key, "rejected": rejected_key}
        if schema != "preference" and keys != DEFAULT_KEYS:
            raise ValueError(
                f"{self.source}: prompt/chosen/rejected keys are read by schema 'preference' only"
            )
        self.schema = row_schema(schema, prompt_key, chosen_key, rejected_key)
        split_names = {"train": train_split, "eval": eval_split}
        # "<dataset split>/<reason>" -> rows skipped
        self.skipped: dict[str, int] = {}

        loaded = _load_checked(
            path, None, data_files, data_dir, split_names.values(), self.schema.columns, f"schema {schema!r}",
            self.source,
        )  # fmt: skip
        rows = {
            split: self._valid_rows(_head(loaded[split], max_rows), split)
            for split in dict.fromkeys(split_names.values())
        }
        self.rows = {role: rows[split] for role, split in split_names.items()}
        self.split_names = split_names

    def _valid_rows(self, dataset: datasets.Dataset, split: str) -> list[dict]:
        """The usable rows of one split as {"prompt", "chosen", "rejected"}; the rest go to ``skipped``."""
        counts = dict.fromkeys(SKIP_REASONS, 0)
        rows = []
        where = f"split {split!r} of {self.source}"
        columns = [_column(dataset, column, where) for column in self.schema.columns]
        for values in zip(*columns):
            if any(value is NOT_UTF8 for value in values):
                counts["non_utf8"] += 1
                continue
            pair = self.schema.adapt(*values)
            reason = pair if isinstance(pair, str) else check_pair(pair)
            if reason is None:
                rows.append(dict(zip(("prompt", "chosen", "rejected"), pair)))
            else:
                counts[reason] += 1
        self.skipped |= {f"{split}/{reason}": n for reason, n in counts.items()}
        if any(counts.values()):
            logger.warning(
                "split %r of %s: skipped %d of %d rows (%s)",
                split, self.source, sum(counts.values()), len(dataset),
                ", ".join(f"{reason}: {n}" for reason, n in counts.items() if n),
            )  # fmt: skip
        if not rows:
            raise ValueError(
                f"split {split!r} of {self.source} has no valid rows (of {len(dataset)}; skipped: {counts})"
            )
        return rows


class TextSource:
    """A text dataset, one document per row in ``text_key``, as the pretraining corpus of PTX:
    ``texts`` maps each interface split ("train", "eval") to its texts. Rows whose text is missing,
    not UTF-8 or blank (wikitext separates its paragraphs with blank lines) are skipped and counted
    in ``skipped`` ("<dataset split>/<reason>"). ``config_name`` is load_dataset's ``name``
    ("wikitext-2-raw-v1", DeepSpeed-Chat's --unsupervised_dataset_config_name)."""

    def __init__(
        self,
        path: str,
        config_name: str | None = None,
        data_files: Any = None,
        data_dir: str | None = None,
        text_key: str = "text",
        train_split: str = "train",
        eval_split: str = "test",
        max_rows: int | None = None,
    ) -> None:
        data_files = _plain(data_files)
        self.source = (
            f"path={path!r}, config_name={config_name!r}, data_files={data_files!r}, data_dir={data_dir!r}"
        )
        if train_split == eval_split:
            raise ValueError(f"{self.source}: the held-out split is the train split {train_split!r}")
        split_names = {"train": train_split, "eval": eval_split}
        loaded = _load_checked(
            path, config_name, data_files, data_dir, split_names.values(), [text_key], "text_key", self.source
        )
        self.skipped: dict[str, int] = {}
        self.texts: dict[str, list[str]] = {}
        for role, split in split_names.items():
            where = f"split {split!r} of {self.source}"
            values = _column(_head(loaded[split], max_rows), text_key, where)
            counts = {"non_utf8": 0, "non_string": 0, "empty_text": 0}
            texts = []
            for value in values:
                if value is NOT_UTF8:
                    counts["non_utf8"] += 1
                elif not isinstance(value, str):
                    counts["non_string"] += 1
                elif not value.strip():
                    counts["empty_text"] += 1
                else:
                    texts.append(value)
            self.skipped |= {f"{split}/{reason}": n for reason, n in counts.items()}
            if not texts:
                raise ValueError(f"{where} has no text (of {len(values)} rows; skipped: {counts})")
            self.texts[role] = texts


def _load_checked(
    path: str,
    config_name: str | None,
    data_files: Any,
    data_dir: str | None,
    splits: Iterable[str],
    columns: Sequence[str],
    read_by: str,
    source: str,
) -> datasets.DatasetDict:
    """``datasets.load_dataset``, failing with a message that names the dataset (``source``) when one
    of ``splits``, or one of the ``columns`` (read by ``read_by``) in them, is not there, or when a
    file does not parse."""
    try:
        loaded = datasets.load_dataset(path, config_name, data_files=data_files, data_dir=data_dir)
    except (DatasetGenerationError, pa.ArrowException) as error:
        # datasets says only that generation failed (or the parser's words, with no file)
        builder = datasets.load_dataset_builder(path, config_name, data_files=data_files, data_dir=data_dir)
        files = [file for split in (builder.config.data_files or {}).values() for file in split]
        culprit = next(filter(None, map(_json_error, files)), None) if builder.name == "json" else None
        cause = error.__cause__ or error
        reason = culprit or f"{', '.join(files)}: {type(cause).__name__}: {cause}"
        raise ValueError(f"{source} does not load: {reason}") from error
    for split in splits:
        if split not in loaded:
            raise ValueError(f"split {split!r} not found in {source}; available splits: {list(loaded)}")
        present = loaded[split].column_names
        for column in columns:
            if column not in present:
                raise ValueError(
                    f"column {column!r} ({read_by}) not found in split {split!r} of {source}; "
                    f"available columns: {present}"
                )
    return loaded


def _json_error(file: str) -> str | None:
    """Where a local JSON (one array) or JSON Lines file stops parsing, as "<file>, line N: reason"."""
    if not file.endswith((".json", ".jsonl")) or not Path(file).is_file():
        return None  # compressed, or on the hub: datasets' own words must do
    # bytes that are not UTF-8 do not stop datasets (their rows are skipped later), so not here either
    text = Path(file).read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None  # one JSON document
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            return f"{file}, line {error.lineno}, column {error.colno}: {error.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as error:
            return f"{file}, line {number}, column {error.colno}: {error.msg}: {line[:80]!r}"
        if not isinstance(row, dict):
            return f"{file}, line {number}: a JSON {type(row).__name__}, not an object: {line[:80]!r}"
    return None


NOT_UTF8 = object()  # a string column's value whose bytes do not decode


def _column(dataset: datasets.Dataset, column: str, where: str) -> list[Any]:
    """A column's values; where a string column holds bytes that are not UTF-8 (pyarrow reads JSON
    without checking), those values become ``NOT_UTF8`` and the first one is named in the log."""
    try:
        return list(dataset[column])  # datasets' columns decode lazily: decode them here
    except UnicodeDecodeError:
        raw = dataset.with_format("arrow")[column].cast(pa.binary()).to_pylist()
    values = []
    for index, data in enumerate(raw):
        try:
            values.append(None if data is None else data.decode("utf-8"))
        except UnicodeDecodeError as error:
            if NOT_UTF8 not in values:
                logger.warning("row %d of %s: column %r is not valid UTF-8 (%s)", index, where, column, error)
            values.append(NOT_UTF8)
    return values


class PreferenceTask(Task):
    """Preference sources blended by weight, their rows split between the stages (module docstring)."""

    has_gold = False

    def __init__(
        self,
        name: str,
        sources: Mapping[str, PreferenceSource],
        weights: Mapping[str, float],
        skipped: dict[str, int],
        stage_split: Sequence[float] | None = None,
        n_eval_prompts: int = 64,
        seed: int = 0,
        prompt_template: str = "{prompt}",
        pretrain: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        # the pretraining corpus from ``TextSource`` arguments; none without a path
        pretrain = _plain(pretrain) or {}
        self._pretrain = TextSource(**pretrain) if pretrain.get("path") is not None else None
        # "[<source name>/ | pretrain/]<dataset split>/<reason>" -> rows skipped
        pretrain_skipped = self._pretrain.skipped if self._pretrain is not None else {}
        self.skipped = skipped | {f"pretrain/{key}": n for key, n in pretrain_skipped.items()}
        stage_split = _plain(stage_split)
        template = _check_template(prompt_template)
        # interface split -> stage -> rows
        self._stages: dict[str, dict[str, list[dict]]] = {}
        for split in SPLITS:
            rows = {
                source_name: [
                    {**row, "prompt": template.format(prompt=row["prompt"])} for row in source.rows[split]
                ]
                for source_name, source in sources.items()
            }
            stages = blend_and_split(rows, weights, stage_split, seed=f"{seed}:{split}")
            self._check_stages(stages, split, sources, stage_split)
            self._stages[split] = stages

        self._rl_prompts = _unique_prompts(self._stages["train"]["rl"])
        train_prompts = {row["prompt"] for rows in self._stages["train"].values() for row in rows}
        eval_unique = _unique_prompts(self._stages["eval"]["rl"])
        held_out = [p for p in eval_unique if p not in train_prompts]
        if len(held_out) < len(eval_unique):
            logger.warning(
                "task %r: %d of %d unique eval prompts are also train prompts; left out of eval prompts",
                name, len(eval_unique) - len(held_out), len(eval_unique),
            )  # fmt: skip
        if not held_out:
            raise ValueError(f"task {name!r}: the eval split has no prompt that is not also a train prompt")
        random.Random(seed).shuffle(held_out)
        self._eval_prompts = held_out[:n_eval_prompts]
        self._chosen_by_prompt: dict[str, str] = {}
        for row in self._stages["train"]["rl"]:
            self._chosen_by_prompt.setdefault(row["prompt"], row["chosen"])

    def _check_stages(
        self,
        stages: dict[str, list[dict]],
        split: str,
        sources: Mapping[str, PreferenceSource],
        stage_split: Sequence[float] | None,
    ) -> None:
        """Every stage needs rows; log how many each got, from where."""
        names = ", ".join(f"{n} ({s.split_names[split]!r} of {s.source})" for n, s in sources.items())
        sizes = {stage: len(rows) for stage, rows in stages.items()}
        logger.info("task %r, %s split of %s: rows per stage %s", self.name, split, names, sizes)
        empty = [stage for stage, n in sizes.items() if n == 0]
        if empty:
            raise ValueError(
                f"task {self.name!r}: stage_split={stage_split} leaves no {split} rows for stage(s) {empty} "
                f"of {names}; rows per stage: {sizes}"
            )

    # ------------------------------------------------------------------ Task interface

    def sft_examples(self, split: str) -> list[dict]:
        check_split(split)
        return [{"prompt": row["prompt"], "response": row["chosen"]} for row in self._stages[split]["sft"]]

    def preference_pairs(self, split: str) -> list[dict]:
        check_split(split)
        return [dict(row) for row in self._stages[split]["reward"]]

    def rl_prompts(self) -> list[str]:
        return list(self._rl_prompts)

    def eval_prompts(self) -> list[str]:
        return list(self._eval_prompts)

    def pretrain_texts(self, split: str) -> list[str]:
        check_split(split)
        return list(self._pretrain.texts[split]) if self._pretrain is not None else []

    def data_stats(self) -> dict[str, int]:
        """``rows/<split>/<stage>`` (and ``rows/<split>/pretrain``, texts) and ``skipped/<skipped key>``
        counts."""
        rows = {
            f"rows/{split}/{stage}": len(r)
            for split, stages in self._stages.items()
            for stage, r in stages.items()
        }
        if self._pretrain is not None:
            rows |= {f"rows/{split}/pretrain": len(self._pretrain.texts[split]) for split in SPLITS}
        return rows | {f"skipped/{key}": n for key, n in self.skipped.items()}

    def chosen_response(self, prompt: str) -> str | None:
        """The chosen response of the first rl row of ``prompt``: RL prompts need not be reward rows."""
        return self._chosen_by_prompt.get(prompt)

    def gold_reward(self, prompts: list[str], responses: list[str]) -> None:
        return None

    def corpus(self) -> list[str]:
        # a row shared by several stages (no stage_split) counts once
        rows = {id(row): row for split in self._stages.values() for stage in split.values() for row in stage}
        texts = [row[field] for row in rows.values() for field in ("prompt", "chosen", "rejected")]
        return texts + [text for split in SPLITS for text in self.pretrain_texts(split)]


class PreferenceDatasetTask(PreferenceTask):
    """One preference dataset as a task: ``source`` holds the ``PreferenceSource`` arguments (path,
    data_files, schema, ...); ``skipped`` keys are "<dataset split>/<reason>"."""

    def __init__(
        self,
        path: str,
        name: str = "preferences",
        stage_split: Sequence[float] | None = None,
        n_eval_prompts: int = 64,
        seed: int = 0,
        prompt_template: str = "{prompt}",
        pretrain: Mapping[str, Any] | None = None,
        **source: Any,
    ) -> None:
        dataset = PreferenceSource(path, **source)
        super().__init__(
            name,
            {name: dataset},
            {name: 1.0},
            dataset.skipped,
            stage_split,
            n_eval_prompts,
            seed,
            prompt_template,
            pretrain,
        )


class BlendedPreferenceTask(PreferenceTask):
    """Several preference datasets, each ``{weight, **PreferenceSource arguments}`` under its name;
    ``skipped`` keys are "<source name>/<dataset split>/<reason>"."""

    def __init__(
        self,
        sources: Mapping[str, Mapping[str, Any]],
        name: str = "blend",
        stage_split: Sequence[float] | None = None,
        n_eval_prompts: int = 64,
        seed: int = 0,
        prompt_template: str = "{prompt}",
        pretrain: Mapping[str, Any] | None = None,
    ) -> None:
        if not sources:
            raise ValueError(f"task {name!r}: a blend needs at least one source")
        built, weights = {}, {}
        for source_name, spec in _plain(sources).items():
            spec = dict(spec)
            weights[source_name] = spec.pop("weight", 1.0)
            built[source_name] = PreferenceSource(**spec)
        skipped = {
            f"{source_name}/{key}": n
            for source_name, source in built.items()
            for key, n in source.skipped.items()
        }
        super().__init__(
            name, built, weights, skipped, stage_split, n_eval_prompts, seed, prompt_template, pretrain
        )


def _head(dataset: datasets.Dataset, max_rows: int | None) -> datasets.Dataset:
    return dataset if max_rows is None else dataset.select(range(min(max_rows, len(dataset))))


def _unique_prompts(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["prompt"] for row in rows))


def _check_template(template: str) -> str:
    """A format string whose one field is {prompt}."""
    problem = f"prompt_template={template!r}: expected a format string with {{prompt}} as its only field"
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(problem) from error
    if "{prompt}" not in template:
        raise ValueError(problem)
    return template
