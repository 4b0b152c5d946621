"""The preference-dataset task reads real files through ``datasets.load_dataset`` and checks them:
missing splits and columns fail with useful messages, unusable rows are skipped and counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from conftest import write_jsonl

from backbone.tasks.base import Task
from backbone.tasks.preference import SKIP_REASONS, PreferenceDatasetTask


def pair(i: int, prompt: str | None = None) -> dict:
    return {
        "prompt": prompt or f"question {i} :",
        "chosen": f"good answer {i} .",
        "rejected": f"bad answer {i} .",
    }


def load(tmp_path: Path, train: list[dict], test: list[dict], **kwargs) -> PreferenceDatasetTask:
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "test": write_jsonl(tmp_path / "test.jsonl", test),
    }
    return PreferenceDatasetTask(path="json", data_files=files, **kwargs)


def test_loads_splits_through_datasets(tmp_path):
    train = [pair(i) for i in range(10)] + [pair(10, prompt="question 0 :")]
    test = [pair(i) for i in range(100, 120)]
    task = load(tmp_path, train, test, n_eval_prompts=5)
    assert isinstance(task, Task) and not task.has_gold and task.name == "preferences"
    assert task.preference_pairs("train") == train
    assert task.preference_pairs("eval") == test
    assert task.sft_examples("train")[3] == {"prompt": "question 3 :", "response": "good answer 3 ."}
    assert task.rl_prompts() == [f"question {i} :" for i in range(10)]  # unique, in order
    assert len(task.eval_prompts()) == 5 and set(task.eval_prompts()) <= {p["prompt"] for p in test}
    assert task.gold_reward(["question 0 :"], ["x"]) is None
    assert {"question 0 :", "good answer 0 .", "bad answer 119 ."} <= set(task.corpus())
    assert task.skipped == {f"{split}/{reason}": 0 for split in ("train", "test") for reason in SKIP_REASONS}


def test_eval_prompts_seeded_and_held_out_from_train(tmp_path):
    train = [pair(i) for i in range(10)]
    test = [pair(i) for i in range(5, 40)]  # prompts 5..9 are also train prompts
    first = load(tmp_path, train, test, n_eval_prompts=8, seed=0)
    assert first.eval_prompts() == load(tmp_path, train, test, n_eval_prompts=8, seed=0).eval_prompts()
    assert first.eval_prompts() != load(tmp_path, train, test, n_eval_prompts=8, seed=1).eval_prompts()
    every = load(tmp_path, train, test, n_eval_prompts=100).eval_prompts()
    assert sorted(every) == sorted(f"question {i} :" for i in range(10, 40))
    with pytest.raises(ValueError, match="not also a train prompt"):
        load(tmp_path, train, train)


def test_parquet_and_custom_columns(tmp_path):
    splits = {
        "train": {"q": ["a :", "b :"], "good": ["yes .", "sure ."], "bad": ["no .", "never ."]},
        "validation": {"q": ["c :"], "good": ["fine ."], "bad": ["meh ."]},
    }
    files = {}
    for split, columns in splits.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        datasets.Dataset.from_dict(columns).to_parquet(files[split])
    task = PreferenceDatasetTask(
        path="parquet",
        data_files=files,
        eval_split="validation",
        prompt_key="q",
        chosen_key="good",
        rejected_key="bad",
    )
    assert task.preference_pairs("train")[1] == {"prompt": "b :", "chosen": "sure .", "rejected": "never ."}
    assert task.sft_examples("eval") == [{"prompt": "c :", "response": "fine ."}]
    assert task.eval_prompts() == ["c :"]


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    bad = [
        {"prompt": "   ", "chosen": "a .", "rejected": "b ."},
        {"prompt": "", "chosen": "a .", "rejected": "b ."},
        {"prompt": "p :", "chosen": "", "rejected": "b ."},
        {"prompt": "p :", "chosen": "a .", "rejected": "  "},
        {"prompt": "p :", "chosen": "same .", "rejected": "same ."},
        {"prompt": "p :", "chosen": "a .", "rejected": None},
        {"prompt": "p :", "chosen": ["a", "list"], "rejected": ["b"]},
    ]
    test = [pair(100), {"prompt": "q :", "chosen": "x .", "rejected": "x ."}]
    with caplog.at_level(logging.WARNING, logger="backbone.tasks.preference"):
        task = load(tmp_path, [pair(0), *bad, pair(1)], test)
    assert task.skipped["train/empty_prompt"] == 2
    assert task.skipped["train/empty_response"] == 2
    assert task.skipped["train/chosen_equals_rejected"] == 1
    assert task.skipped["train/non_string"] == 2
    assert task.skipped["test/chosen_equals_rejected"] == 1
    assert task.preference_pairs("train") == [pair(0), pair(1)]
    assert task.preference_pairs("eval") == [pair(100)]
    assert (
        "skipped 7 of 9 rows" in caplog.text and "empty_prompt: 2" in caplog.text and "'test'" in caplog.text
    )


def test_bytes_that_are_not_utf8_skip_their_row_and_name_it(tmp_path, caplog):
    good = '{"prompt": "p %d :", "chosen": "a .", "rejected": "b ."}\n'
    (tmp_path / "train.jsonl").write_bytes(
        (good % 0).encode()
        + b'{"prompt": "p \xff\xfe :", "chosen": "a .", "rejected": "b ."}\n'
        + (good % 2).encode()
    )
    (tmp_path / "test.jsonl").write_bytes((good % 9).encode())
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    with caplog.at_level(logging.WARNING, logger="backbone.tasks.preference"):
        task = PreferenceDatasetTask(path="json", data_files=files)
    assert task.skipped["train/non_utf8"] == 1
    assert [p["prompt"] for p in task.preference_pairs("train")] == ["p 0 :", "p 2 :"]
    assert "row 1 of split 'train'" in caplog.text and "column 'prompt' is not valid UTF-8" in caplog.text


def test_missing_column_names_it(tmp_path):
    rows = [{"question": "p :", "chosen": "a .", "rejected": "b ."}]
    with pytest.raises(ValueError, match="column 'prompt'") as err:
        load(tmp_path, rows, rows)
    assert "question" in str(err.value) and "train.jsonl" in str(err.value)
    with pytest.raises(ValueError, match="column 'better'"):
        load(tmp_path, [pair(0)], [pair(1)], chosen_key="better")


def test_missing_split_names_it_and_the_available_ones(tmp_path):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", [pair(0)])}
    with pytest.raises(ValueError, match=r"split 'test' not found.*available splits: \['train'\]"):
        PreferenceDatasetTask(path="json", data_files=files)


def test_split_without_valid_rows_fails(tmp_path):
    empty = [
        {"prompt": "p :", "chosen": "same .", "rejected": "same ."},
        {"prompt": " ", "chosen": "a", "rejected": "b"},
    ]
    with pytest.raises(ValueError, match=r"split 'test'.*no valid rows"):
        load(tmp_path, [pair(0)], empty)


def test_unknown_interface_split(tmp_path):
    task = load(tmp_path, [pair(0)], [pair(1)])
    with pytest.raises(ValueError, match="unknown split"):
        task.preference_pairs("test")


def test_built_from_the_hydra_config(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from backbone.config import PreferenceDatasetConfig

    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", [pair(0)]),
        "test": [write_jsonl(tmp_path / f"test{i}.jsonl", [pair(i)]) for i in (1, 2)],
    }
    cfg = OmegaConf.merge(
        OmegaConf.structured(PreferenceDatasetConfig), {"path": "json", "data_files": files}
    )
    task = instantiate(cfg)
    assert task.rl_prompts() == ["question 0 :"]
    assert sorted(task.eval_prompts()) == ["question 1 :", "question 2 :"]


def test_a_line_that_is_not_json_names_the_file_and_line(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        json.dumps(pair(0)) + "\n" + '{"prompt": "p :", chosen: "a ."}\n' + json.dumps(pair(2)) + "\n"
    )
    files = {"train": str(train), "test": write_jsonl(tmp_path / "test.jsonl", [pair(9)])}
    with pytest.raises(ValueError, match=rf"{train}, line 2, column 19: Expecting property name"):
        PreferenceDatasetTask(path="json", data_files=files)


def test_a_json_array_that_does_not_parse_names_its_line(tmp_path):
    (tmp_path / "train.json").write_text(f"[{json.dumps(pair(0))},\n{{'prompt': 1}}]\n")
    files = {"train": str(tmp_path / "train.json"), "test": write_jsonl(tmp_path / "test.jsonl", [pair(9)])}
    with pytest.raises(ValueError, match=r"train.json, line 2, column 2: Expecting property name"):
        PreferenceDatasetTask(path="json", data_files=files)


def test_a_csv_that_does_not_parse_names_the_file_and_the_parser_reason(tmp_path):
    (tmp_path / "train.csv").write_text('prompt,chosen,rejected\np,a,b\n"p,a\n')
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "train.csv")}
    with pytest.raises(ValueError, match=r"train.csv: ParserError: .*EOF inside string"):
        PreferenceDatasetTask(path="csv", data_files=files)
