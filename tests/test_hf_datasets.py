"""Real preference datasets in their own schemas (hh-rlhf, rm-static, SHP, StackExchange-paired),
read from small local files through ``datasets.load_dataset``; blending by weight and the
DeepSpeed-Chat stage split that gives SFT, reward model and RL disjoint rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import pytest
from conftest import compose_config, write_jsonl
from hydra.utils import instantiate

from backbone.tasks.blend import blend_counts
from backbone.tasks.preference import BlendedPreferenceTask, PreferenceDatasetTask
from backbone.tasks.schemas import check_pair, hh_rlhf, row_schema, shp

H, A = "\n\nHuman: ", "\n\nAssistant:"


def hh_row(i: int, chosen: str | None = None, rejected: str | None = None) -> dict:
    """A two-turn hh-rlhf row; the prompt is both turns up to the last "Assistant:"."""
    dialogue = f"{H}hi {i}{A} hello.{H}question {i}?{A}"
    return {
        "chosen": dialogue + (chosen or f" helpful {i}."),
        "rejected": dialogue + (rejected or f" rude {i}."),
    }


def rm_static_row(i: int) -> dict:
    prompt = f"{H}question {i}?{A}"
    return {"prompt": prompt, "response": f" good {i}.", "chosen": f" good {i}.", "rejected": f" bad {i}."}


def shp_row(i: int, label: int | None = 1) -> dict:
    return {"history": f"post {i}", "human_ref_A": f"ref a {i}", "human_ref_B": f"ref b {i}", "labels": label}


def se_row(i: int) -> dict:
    return {"question": f"how {i}?", "response_j": f"like this {i}", "response_k": f"no idea {i}"}


def files(folder: Path, train: list[dict], test: list[dict]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        split: write_jsonl(folder / f"{split}.jsonl", rows)
        for split, rows in (("train", train), ("test", test))
    }


def hh_task(folder: Path, n_train: int = 100, n_test: int = 50, **kwargs) -> PreferenceDatasetTask:
    data = files(folder, [hh_row(i) for i in range(n_train)], [hh_row(i) for i in range(1000, 1000 + n_test)])
    return PreferenceDatasetTask(path="json", data_files=data, schema="hh_rlhf", **kwargs)


# --------------------------------------------------------------------------- row adapters


def test_hh_rlhf_prompt_is_the_dialogue_up_to_the_last_assistant_turn():
    prompt, chosen, rejected = hh_rlhf(**hh_row(3))
    assert prompt == f"{H}hi 3{A} hello.{H}question 3?{A}"
    assert (chosen, rejected) == (" helpful 3.", " rude 3.")
    assert hh_rlhf(chosen=f"{H}no reply", rejected=f"{H}no reply") == "no_assistant_turn"
    other_history = {"chosen": hh_row(1)["chosen"], "rejected": hh_row(2)["rejected"]}
    assert hh_rlhf(**other_history) == "prompt_mismatch"
    assert hh_rlhf(chosen=None, rejected="x") == "non_string"


def test_shp_label_picks_the_chosen_reference_and_questions_become_dialogues():
    assert shp(*shp_row(1, label=1).values()) == (f"{H}post 1{A}", " ref a 1", " ref b 1")
    assert shp(*shp_row(1, label=0).values()) == (f"{H}post 1{A}", " ref b 1", " ref a 1")
    assert shp(*shp_row(1, label=2).values()) == "bad_label"
    assert shp(*shp_row(1, label=None).values()) == "bad_label"
    schema = row_schema("stack_exchange_paired", "prompt", "chosen", "rejected")
    assert schema.adapt(*se_row(4).values()) == (f"{H}how 4?{A}", " like this 4", " no idea 4")


def test_shared_checks_and_unknown_schema():
    assert check_pair(("p", " a", " b")) is None
    assert check_pair((" ", " a", " b")) == "empty_prompt"
    assert check_pair(("p", " ", " b")) == "empty_response"
    assert check_pair(("p", " same", "same ")) == "chosen_equals_rejected"
    with pytest.raises(ValueError, match=r"unknown schema 'hh'.*hh_rlhf"):
        row_schema("hh", "prompt", "chosen", "rejected")


# --------------------------------------------------------------------------- each schema through load_dataset


def test_hh_rlhf_file_skips_and_counts_malformed_rows(tmp_path, caplog):
    malformed = [
        {"chosen": f"{H}no reply", "rejected": f"{H}no reply either"},
        {"chosen": hh_row(1)["chosen"], "rejected": hh_row(2)["rejected"]},
        hh_row(3, chosen=" same.", rejected=" same."),
        hh_row(4, chosen=" "),
        {"chosen": hh_row(5)["chosen"]},  # rejected missing: null in the loaded table
    ]
    data = files(tmp_path, [hh_row(0), *malformed, hh_row(6)], [hh_row(100)])
    with caplog.at_level("WARNING", logger="backbone.tasks.preference"):
        task = PreferenceDatasetTask(path="json", data_files=data, schema="hh_rlhf", name="hh")
    skipped = {key: n for key, n in task.skipped.items() if n}
    assert skipped == {
        "train/no_assistant_turn": 1,
        "train/prompt_mismatch": 1,
        "train/chosen_equals_rejected": 1,
        "train/empty_response": 1,
        "train/non_string": 1,
    }
    assert "skipped 5 of 7 rows" in caplog.text and "train.jsonl" in caplog.text
    stats = task.data_stats()  # what the run summary records
    assert stats["skipped/train/prompt_mismatch"] == 1 and stats["rows/train/sft"] == 2
    assert [p["chosen"] for p in task.preference_pairs("train")] == [" helpful 0.", " helpful 6."]
    assert task.eval_prompts() == [f"{H}hi 100{A} hello.{H}question 100?{A}"]


@pytest.mark.parametrize(
    ("schema", "row"),
    [("rm_static", rm_static_row), ("stack_exchange_paired", se_row), ("shp", shp_row)],
)
def test_each_schema_loads_from_a_local_folder(tmp_path, schema, row):
    # load_dataset(folder) finds the splits by file name, as it does in a hub repository
    for split, offset in (("train", 0), ("test", 100)):
        datasets.Dataset.from_list([row(offset + i) for i in range(4)]).to_parquet(
            tmp_path / f"{split}.parquet"
        )
    task = PreferenceDatasetTask(path=str(tmp_path), schema=schema)
    pair = task.preference_pairs("train")[1]
    assert pair["prompt"].startswith(H) and pair["prompt"].endswith(A) and "1" in pair["prompt"]
    assert pair["chosen"].startswith(" ") and pair["chosen"] != pair["rejected"]
    assert len(task.rl_prompts()) == 4 and len(task.eval_prompts()) == 4


def test_missing_columns_and_empty_splits_name_the_dataset(tmp_path):
    data = files(tmp_path, [hh_row(0)], [hh_row(1)])
    with pytest.raises(ValueError, match=r"column 'history' \(schema 'shp'\).*\['chosen', 'rejected'\]"):
        PreferenceDatasetTask(path="json", data_files=data, schema="shp")
    with pytest.raises(ValueError, match="keys are read by schema 'preference' only"):
        PreferenceDatasetTask(path="json", data_files=data, schema="hh_rlhf", prompt_key="question")
    broken = files(tmp_path / "broken", [hh_row(0)], [{"chosen": "no turns", "rejected": "none"}])
    with pytest.raises(ValueError, match=r"split 'test' of path='json'.*broken/test.jsonl.*no valid rows"):
        PreferenceDatasetTask(path="json", data_files=broken, schema="hh_rlhf")


# --------------------------------------------------------------------------- stage split and blending


def row_ids(task: PreferenceDatasetTask, split: str) -> dict[str, set[str]]:
    """Each stage's rows of ``split``, named by their prompt (unique per row here)."""
    return {
        "sft": {r["prompt"] for r in task.sft_examples(split)},
        "reward": {r["prompt"] for r in task.preference_pairs(split)},
    }


def test_stage_split_gives_each_stage_its_own_rows(tmp_path):
    task = hh_task(tmp_path, stage_split=[0.2, 0.4, 0.4], n_eval_prompts=100, seed=3)
    for split, n in (("train", 100), ("eval", 50)):
        stages = row_ids(task, split)
        stages["rl"] = set(task.rl_prompts() if split == "train" else task.eval_prompts())
        assert [len(stages[s]) for s in ("sft", "reward", "rl")] == [n // 5, 2 * n // 5, 2 * n // 5]
        assert len(set.union(*stages.values())) == n  # disjoint
    # RRHF's chosen response is found for RL prompts, which are no reward rows
    assert task.chosen_response(task.rl_prompts()[0]).startswith(" helpful")
    # seeded: the same seed gives the same split, another seed another one
    again = hh_task(tmp_path, stage_split=[0.2, 0.4, 0.4], seed=3)
    assert row_ids(again, "train") == row_ids(task, "train") and again.rl_prompts() == task.rl_prompts()
    assert row_ids(hh_task(tmp_path, stage_split=[0.2, 0.4, 0.4], seed=4), "train") != row_ids(task, "train")


def test_stage_split_errors(tmp_path):
    with pytest.raises(ValueError, match="3 positive shares"):
        hh_task(tmp_path, stage_split=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"no eval rows for stage\(s\) \['sft'\].*test.jsonl"):
        hh_task(tmp_path, n_test=2, stage_split=[0.2, 0.4, 0.4])


def test_prompt_template_wraps_every_prompt(tmp_path):
    task = hh_task(tmp_path, prompt_template="<s>{prompt}")
    prompts = [r["prompt"] for r in task.sft_examples("train")] + task.rl_prompts() + task.eval_prompts()
    assert all(p.startswith(f"<s>{H}hi") for p in prompts)
    with pytest.raises(ValueError, match=r"prompt_template='\{question\}'"):
        hh_task(tmp_path, prompt_template="{question}")


def test_blend_counts_keep_the_weights_and_repeat_no_row():
    assert blend_counts({"a": 100, "b": 100}, {"a": 1, "b": 1}) == {"a": 100, "b": 100}
    assert blend_counts({"a": 100, "b": 100}, {"a": 1, "b": 3}) == {"a": 33, "b": 100}
    assert blend_counts({"a": 1000, "b": 50}, {"a": 1, "b": 1}) == {"a": 50, "b": 50}


def hh_rows(n: int) -> tuple[list[dict], list[dict]]:
    return [hh_row(i) for i in range(n)], [hh_row(i) for i in range(1000, 1000 + n // 2)]


def se_files(folder: Path) -> dict[str, str]:
    return files(folder, [se_row(i) for i in range(200)], [se_row(i) for i in range(1000, 1100)])


def source_of(prompt: str) -> str:
    """Which test dataset a prompt came from: hh rows greet first, StackExchange rows ask how."""
    return "hh" if "hello." in prompt else "se" if "how" in prompt else "static"


def test_weights_set_the_mixture_of_every_stage(tmp_path):
    sources = {
        "hh": {"path": "json", "schema": "hh_rlhf", "data_files": files(tmp_path / "hh", *hh_rows(200))},
        "se": {"path": "json", "schema": "stack_exchange_paired", "data_files": se_files(tmp_path / "se")},
    }

    def hh_shares(weights: dict[str, float]) -> list[float]:
        spec = {name: {**source, "weight": weights[name]} for name, source in sources.items()}
        task = BlendedPreferenceTask(spec, stage_split=[0.2, 0.4, 0.4])
        stages = [[r["prompt"] for r in task.sft_examples("train")], task.rl_prompts()]
        return [sum(source_of(p) == "hh" for p in prompts) / len(prompts) for prompts in stages]

    assert hh_shares({"hh": 1, "se": 1}) == pytest.approx([0.5, 0.5], abs=0.03)
    assert hh_shares({"hh": 3, "se": 1}) == pytest.approx([0.75, 0.75], abs=0.03)


def test_blend_config_composes_local_sources(tmp_path):
    """conf/task/blend.yaml with its sources pointed at local files, one dropped and one added."""
    static = files(
        tmp_path / "static", [rm_static_row(i) for i in range(40)], [rm_static_row(i) for i in range(40, 60)]
    )
    local = {
        "hh_rlhf": files(tmp_path / "hh", *hh_rows(40)),
        "stack_exchange_paired": se_files(tmp_path / "se"),
        "static": static,
    }
    overrides = ["task=blend", "~task.sources.shp", "+dataset@task.sources.static=rm_static"]
    for name, data in local.items():
        overrides += [
            f"task.sources.{name}.path=json",
            f"task.sources.{name}.data_files={{train: '{data['train']}', test: '{data['test']}'}}",
        ]
    overrides.append("task.sources.stack_exchange_paired.max_rows=40")
    task = instantiate(compose_config(overrides).task)
    assert task.name == "blend" and task.skipped["static/train/empty_prompt"] == 0
    # 20% of 40 rows from each of the three sources
    assert Counter(source_of(r["prompt"]) for r in task.sft_examples("train")) == {
        "hh": 8,
        "se": 8,
        "static": 8,
    }


# --------------------------------------------------------------------------- PTX's pretraining corpus


def text_rows(split: str, n: int) -> list[dict]:
    """Wikitext's schema: one paragraph per row of a ``text`` column, blank rows between them."""
    return [
        {"text": f" {split} paragraph {i} about nothing in particular .\n" if i % 3 else ""} for i in range(n)
    ]


def test_a_text_dataset_is_the_pretraining_corpus(tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    for split, n in (("train", 9), ("validation", 6)):
        datasets.Dataset.from_list(text_rows(split, n)).to_parquet(folder / f"{split}.parquet")
    task = hh_task(tmp_path / "hh", pretrain={"path": str(folder), "eval_split": "validation"})
    train = [r["text"] for r in text_rows("train", 9) if r["text"]]
    assert task.pretrain_texts("train") == train and len(train) == 6
    assert task.pretrain_texts("eval") == [r["text"] for r in text_rows("validation", 6) if r["text"]]
    assert task.skipped["pretrain/train/empty_text"] == 3 and task.skipped["train/empty_response"] == 0
    stats = task.data_stats()
    assert stats["rows/train/pretrain"] == 6 and stats["rows/eval/pretrain"] == 4
    assert set(train) <= set(task.corpus())  # a locally built tokenizer learns its words
    assert hh_task(tmp_path / "hh").pretrain_texts("train") == []  # no corpus unless named
    with pytest.raises(
        ValueError, match=r"column 'body' \(text_key\) not found in split 'train'.*\['text'\]"
    ):
        hh_task(
            tmp_path / "hh", pretrain={"path": str(folder), "eval_split": "validation", "text_key": "body"}
        )
    with pytest.raises(ValueError, match=r"split 'test' not found.*\['train', 'validation'\]"):
        hh_task(tmp_path / "hh", pretrain={"path": str(folder)})
    with pytest.raises(ValueError, match="held-out split is the train split 'train'"):
        hh_task(tmp_path / "hh", pretrain={"path": str(folder), "eval_split": "train"})


def test_the_pretraining_corpus_from_the_hydra_config_with_a_dataset_config_name(tmp_path):
    """task.pretrain as a user writes it; config_name picks one configuration of a dataset, as
    load_dataset("wikitext", "wikitext-2-raw-v1") does (here from a local folder's README)."""
    folder = tmp_path / "corpus"
    for name, n in (("small", 4), ("large", 12)):
        (folder / name).mkdir(parents=True)
        for split in ("train", "test"):
            write_jsonl(folder / name / f"{split}.jsonl", [{"text": f"{name} {split} {i}"} for i in range(n)])
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: {name}/{split}.jsonl\n" for split in ("train", "test"))
        for name in ("small", "large")
    )
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    data = files(tmp_path / "hh", *hh_rows(20))
    overrides = [
        "task=local_preferences",
        "task.path=json",
        f"task.data_files={{train: '{data['train']}', test: '{data['test']}'}}",
        "task.schema=hh_rlhf",
        f"task.pretrain.path={folder}",
        "task.pretrain.config_name=large",
        "task.pretrain.max_rows=10",
    ]
    task = instantiate(compose_config(overrides).task)
    assert task.pretrain_texts("train") == [f"large train {i}" for i in range(10)]
    assert task.pretrain_texts("eval") == [f"large test {i}" for i in range(10)]
