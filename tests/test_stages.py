"""SFT and reward-model stages: the losses against direct computations, learning on a tiny task,
the saved artifacts, the cached pipeline, and a local prompt/chosen/rejected dataset."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from transformers import GPT2Model

from backbone.models import (
    ValueModel,
    build_tiny_causal_lm,
    encode_pair,
    load_tokenizer,
    pad_pairs,
    train_word_tokenizer,
)
from backbone.rng import apply_seed_scope
from backbone.stages import (
    METRICS_FILE,
    StageBuild,
    build_base,
    pairwise_loss,
    prepare_stages,
    sft_loss,
    stage_rows_to,
    train_reward_model,
    train_sft,
)
from backbone.tasks.base import Task, check_split

ITEMS = ["lamp", "chair", "phone", "shoe", "book", "cup"]
GOOD = ["good", "great", "fine", "lovely"]
BAD = ["bad", "awful", "poor", "broken"]


class FakeTask(Task):
    """Reviews whose gold reward counts good minus bad words: trivially learnable."""

    name = "fake"
    has_gold = True

    def __init__(self, n_train: int = 192, n_eval: int = 48, empty: str | None = None):
        self.sizes = {"train": n_train, "eval": n_eval}
        self.empty = empty  # a split to leave empty

    def _items(self, split: str) -> list[tuple[str, random.Random]]:
        """The product of each row of ``split`` and the seeded stream its words are drawn from."""
        check_split(split)
        rng = random.Random(split)
        return [(rng.choice(ITEMS), rng) for _ in range(0 if split == self.empty else self.sizes[split])]

    def sft_examples(self, split):
        return [
            {"prompt": f"review of the {item} :", "response": f"the {item} is {rng.choice(GOOD)}"}
            for item, rng in self._items(split)
        ]

    def preference_pairs(self, split):
        return [
            {
                "prompt": f"review of the {item} :",
                "chosen": f"the {item} is {rng.choice(GOOD)}",
                "rejected": f"the {item} is {rng.choice(BAD)}",
            }
            for item, rng in self._items(split)
        ]

    def rl_prompts(self):
        return [f"review of the {item} :" for item in ITEMS]

    def eval_prompts(self):
        return self.rl_prompts()[:2]

    def gold_reward(self, prompts, responses):
        return [sum((w in GOOD) - (w in BAD) for w in r.split()) for r in responses]

    def corpus(self):
        return [" ".join([*ITEMS, *GOOD, *BAD, "review of the : is"])]


def make_cfg(tmp_path: Path, *overrides: str):
    tiny = [
        "model.n_layer=2",
        "model.n_embd=32",
        "model.n_head=2",
        "model.n_positions=32",
        "model.max_length=32",
        "sft.epochs=3",
        "sft.batch_size=16",
        "sft.eval_every=10",
        "reward_model.epochs=3",
        "reward_model.batch_size=16",
        "reward_model.eval_every=10",
        "engine.device=cpu",
        f"paths.artifacts={tmp_path / 'artifacts'}",
    ]
    return compose_config([*tiny, *overrides])


def tiny_model():
    task = FakeTask()
    tokenizer = train_word_tokenizer(task.corpus())
    torch.manual_seed(0)
    cfg = type("Cfg", (), {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32, "dropout": 0.0})
    return tokenizer, build_tiny_causal_lm(tokenizer, cfg).eval()


def test_sft_loss_counts_response_tokens_only():
    tokenizer, model = tiny_model()
    rows = [("review of the lamp :", "the lamp is good"), ("of the cup :", "the cup is awful and bad")]
    pairs = [encode_pair(tokenizer, p, r, max_length=32)[:2] for p, r in rows]
    nll, n = sft_loss(model, pad_pairs(pairs, tokenizer.pad_token_id))

    # direct: each row alone, unpadded; -log p of every response token and the EOS
    expected, count = 0.0, 0
    with torch.no_grad():
        for prompt_ids, response_ids in pairs:
            ids = torch.tensor([prompt_ids + response_ids])
            logp = torch.log_softmax(model(ids).logits[0], dim=-1)
            for t, token in enumerate(response_ids):
                expected -= logp[len(prompt_ids) + t - 1, token].item()
                count += 1
    assert pairs[1][1][-1] == tokenizer.eos_token_id
    assert int(n) == count == 5 + 7
    assert nll.item() == pytest.approx(expected, rel=1e-4)


def test_pairwise_loss_and_poolings_match_direct_computation():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    direct = sum(-torch.log(torch.sigmoid(c - r)) for c, r in zip(chosen, rejected)) / 3
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(direct.item(), rel=1e-6)

    values = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 4.0, 5.0, 6.0]])
    attention = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    _, lm = tiny_model()
    for pooling in ("last", "mean"):
        model = ValueModel(GPT2Model(lm.config), pooling=pooling)
        expected = []
        for v, a, r in zip(values.tolist(), attention.tolist(), response.tolist()):
            if pooling == "last":
                expected.append(v[max(i for i, m in enumerate(a) if m)])
            else:
                expected.append(sum(x for x, m in zip(v, r) if m) / sum(r))
        assert model.pool(values, attention, response).tolist() == pytest.approx(expected)


def test_sft_then_reward_model_learn_and_reload(tmp_path):
    cfg = make_cfg(tmp_path)
    task = FakeTask()
    rows: list[dict] = []
    base = build_base(cfg, task)
    sft_metrics = train_sft(cfg, task, base, tmp_path / "sft", rows.append)
    initial = next(r["sft/eval_loss"] for r in rows if r["sft/step"] == 0)
    assert sft_metrics["sft/eval_loss"] < 0.6 * initial
    assert {"sft/step", "sft/loss", "sft/lr", "sft/tokens"} <= set(rows[1])
    assert (tmp_path / "sft" / "model.safetensors").exists()

    rm_metrics = train_reward_model(cfg, task, tmp_path / "sft", tmp_path / "rm", rows.append)
    assert rm_metrics["rm/eval_accuracy"] > 0.8
    assert rm_metrics["rm/eval_spearman"] > 0.5
    assert {"rm/step", "rm/loss", "rm/accuracy"} <= set(rows[-2])
    saved = json.loads((tmp_path / "rm" / METRICS_FILE).read_text())
    assert saved["rm/eval_accuracy"] == rm_metrics["rm/eval_accuracy"] and "rm/wall_time_s" in saved

    # the artifact loads back and gives the scores its statistics were computed from
    model = ValueModel.from_pretrained(tmp_path / "rm").eval()
    assert model.pooling == "last"
    assert model.metadata["chosen_mean"] == rm_metrics["rm/chosen_mean"]
    tokenizer = load_tokenizer(tmp_path / "rm")
    chosen = [
        encode_pair(tokenizer, r["prompt"], r["chosen"], 32)[:2] for r in task.preference_pairs("train")
    ]
    batch = pad_pairs(chosen, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model.score(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert scores.mean().item() == pytest.approx(rm_metrics["rm/chosen_mean"], abs=1e-5)
    assert scores.std().item() == pytest.approx(rm_metrics["rm/chosen_std"], abs=1e-5)


def test_prepare_stages_builds_once_and_reuses(tmp_path):
    cfg = make_cfg(tmp_path, "sft.epochs=1", "reward_model.epochs=1", "reward.pooling=mean")
    rows: list[dict] = []
    first = prepare_stages(cfg, FakeTask(), stage_rows_to(rows.append))
    assert rows and first.sft_metrics["sft/train_examples"] == 192
    assert ValueModel.from_pretrained(first.reward).pooling == "mean"
    built = len(rows)
    again = prepare_stages(cfg, FakeTask(), stage_rows_to(rows.append))
    assert len(rows) == built, "a cache hit trains nothing"
    assert (again.base, again.sft, again.reward) == (first.base, first.sft, first.reward)
    assert again.rm_metrics == first.rm_metrics
    # a changed reward-model config retrains the reward model only
    changed = prepare_stages(
        make_cfg(tmp_path, "sft.epochs=1", "reward_model.epochs=2"), FakeTask(), stage_rows_to(rows.append)
    )
    assert changed.sft == first.sft and changed.reward != first.reward


def test_a_critic_from_another_pooling_gets_its_own_reward_model_and_the_reward_stays(tmp_path):
    """critic.init=reward_mean: a second reward-model artifact, the same stage and pipeline seed with only
    the pooling changed, built once; the run's reward stays the last-token reward model."""

    def stages(*overrides: str):
        cfg = make_cfg(tmp_path, "sft.epochs=1", "reward_model.epochs=1", "seed=7", *overrides)
        return prepare_stages(apply_seed_scope(cfg), FakeTask(), record)

    @contextmanager
    def record(build: StageBuild):
        builds.append(build)
        yield rows.append

    rows: list[dict] = []
    builds: list[StageBuild] = []
    plain = stages()
    assert plain.critic == plain.reward  # critic.init=reward: a copy of the reward model itself
    assert [(b.kind, b.folder, b.inputs) for b in builds] == [
        ("sft", plain.sft, (plain.base,)),
        ("reward", plain.reward, (plain.sft,)),
    ]
    built = len(rows)
    mean = stages("critic.init=reward_mean")
    assert (mean.sft, mean.reward) == (plain.sft, plain.reward)
    assert mean.critic != mean.reward
    assert ValueModel.from_pretrained(mean.reward).pooling == "last"
    assert ValueModel.from_pretrained(mean.critic).pooling == "mean"
    reward_key, critic_key = (json.loads((f / "key.json").read_text()) for f in (mean.reward, mean.critic))
    assert critic_key["reward_model"]["seed"] == reward_key["reward_model"]["seed"] == 7  # the pipeline's
    assert critic_key == {**reward_key, "pooling": "mean"}
    # a reward-model build of its own
    assert [(b.kind, b.folder, b.inputs, b.key["pooling"]) for b in builds[2:]] == [
        ("reward", mean.critic, (plain.sft,), "mean")
    ]
    critic_rows = rows[built:]
    assert critic_rows and all(key.startswith("rm/") for row in critic_rows for key in row)
    assert stages("critic.init=reward_mean").critic == mean.critic and len(rows) == built + len(critic_rows)
    assert stages("critic.init=reward_last").critic == plain.reward  # the reward's own pooling: no build
    assert stages("critic.init=sft").critic == plain.sft
    assert len(rows) == built + len(critic_rows) and len(builds) == 3
    # (critic.init=reward_max fails at composition)


@pytest.mark.parametrize(("empty", "stage"), [("train", "sft"), ("eval", "sft"), ("eval", "rm")])
def test_empty_split_fails_naming_task_and_split(tmp_path, empty, stage):
    cfg = make_cfg(tmp_path)
    task = FakeTask(empty=empty)
    base = build_base(cfg, FakeTask())
    train = train_sft if stage == "sft" else train_reward_model
    with pytest.raises(ValueError, match=f"'fake'.*'{empty}'"):
        train(cfg, task, base, tmp_path / "out", lambda row: None)


def test_long_rows_are_truncated_and_counted(tmp_path):
    cfg = make_cfg(tmp_path, "model.max_length=8", "sft.epochs=1")
    metrics = train_sft(
        cfg, FakeTask(n_train=32, n_eval=8), build_base(cfg, FakeTask()), tmp_path / "sft", print
    )
    # "review of the X :" (5) + "the X is Y" + EOS (5) = 10 tokens > 8
    assert metrics["sft/truncated"] == 32


def test_local_preference_dataset_trains_both_stages(tmp_path):
    preference = pytest.importorskip("backbone.tasks.preference")
    rng = random.Random(0)
    # eval prompts must not be train prompts: the splits review different products
    for split, n, items in (("train", 96, ITEMS[:4]), ("test", 32, ITEMS[4:])):
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                item = rng.choice(items)
                row = {
                    "prompt": f"review of the {item} :",
                    "chosen": f"the {item} is {rng.choice(GOOD)}",
                    "rejected": f"the {item} is {rng.choice(BAD)}",
                }
                f.write(json.dumps(row) + "\n")
    data_files = f"{{train: {tmp_path / 'train.jsonl'}, test: {tmp_path / 'test.jsonl'}}}"
    cfg = make_cfg(tmp_path, "task=local_preferences", "task.path=json", f"task.data_files={data_files}")
    task = instantiate(cfg.task)
    assert isinstance(task, preference.PreferenceDatasetTask) and not task.has_gold
    stages = prepare_stages(cfg, task, stage_rows_to(lambda row: None))
    assert stages.sft_metrics["sft/train_examples"] == 96
    assert "rm/eval_spearman" not in stages.rm_metrics
    assert 0.0 <= stages.rm_metrics["rm/eval_accuracy"] <= 1.0
