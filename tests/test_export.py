"""Hugging Face exports (``python -m experiments.export``): a real run's actor, reward model and critic,
loaded back with the Auto classes, compute what the sandbox's own passes compute, on padded batches;
with full models and with LoRA adapters merged. Value models the HF class would score differently
are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_entry
from hydra.utils import instantiate
from test_real_models import A, H, checkpoints  # noqa: F401 (checkpoints: a fixture)
from test_run import SMALL
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from backbone.export import sequence_classifier
from backbone.models import (
    ValueModel,
    encode_pair,
    last_position,
    load_tokenizer,
    pad_pairs,
    position_ids,
)
from backbone.roles import build_policy_stack
from experiments.export import ROLES, check_exportable, locate, main

# --------------------------------------------------------------------------- one family at a time


def reload(folder: Path):
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def biased(value_model: ValueModel, bias: float) -> ValueModel:
    with torch.no_grad():
        value_model.head.bias.fill_(bias)
    return value_model.eval()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_a_value_model_scores_the_same_where_pad_is_eos(checkpoints, family, tmp_path):  # noqa: F811
    """GPT-2 and Pythia pad with EOS: the export gets a pad token of its own, so the EOS that closes a
    response is scored, as the sandbox scores it; the head's bias goes into the final LayerNorm."""
    torch.manual_seed(0)
    values = biased(ValueModel.from_causal_lm(checkpoints[family]), 0.8)
    tokenizer = load_tokenizer(checkpoints[family])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    classifier, exported_tokenizer = sequence_classifier(values, tokenizer, "rm")
    classifier.save_pretrained(tmp_path)
    exported_tokenizer.save_pretrained(tmp_path)
    model, hf_tokenizer = reload(tmp_path)
    assert hf_tokenizer.pad_token_id != hf_tokenizer.eos_token_id and hf_tokenizer.padding_side == "right"

    pairs = [(f"{H}is the lamp good?{A}", " yes, it is bright."), (f"{H}hi{A}", " no.")]
    # the sandbox: prompt left-padded, response (closed by EOS) right-padded
    encoded = [encode_pair(tokenizer, p, r, 64)[:2] for p, r in pairs]
    batch = pad_pairs(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = values.score(batch["input_ids"], batch["attention_mask"])
        # plain HF: the texts with their EOS, padded by the exported tokenizer
        hf_batch = hf_tokenizer(
            [p + r + hf_tokenizer.eos_token for p, r in pairs], padding=True, return_tensors="pt"
        )
        assert hf_batch["attention_mask"].sum().item() == sum(len(p) + len(r) for p, r in encoded)
        torch.testing.assert_close(model(**hf_batch).logits[:, 0], expected)


def test_a_bias_with_nowhere_to_go_is_refused_and_a_zero_one_exported(checkpoints):  # noqa: F811
    """LLaMA's last layer is an RMSNorm, without a bias for the head's to fold into."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(checkpoints["llama"])
    values = biased(ValueModel.from_causal_lm(checkpoints["llama"]), 0.5)
    with pytest.raises(
        ValueError, match=r"rm: its value head has a bias .* LlamaForSequenceClassification.*norm"
    ):
        sequence_classifier(values, tokenizer, "rm")
    classifier, _ = sequence_classifier(biased(values, 0.0), tokenizer, "rm")
    assert type(classifier).__name__ == "LlamaForSequenceClassification"


# --------------------------------------------------------------------------- a real run, exported

RUN = [*SMALL, "iterations=2", "logger.mode=disabled", "frontier.best_of_n=0"]


@pytest.fixture(scope="module", params=["none", "lora_multi_adapter"])
def exported(request, tmp_path_factory, artifacts_dir) -> tuple[Path, Path]:
    run_dir = tmp_path_factory.mktemp(f"run_{request.param}")
    run_entry(
        [*RUN, f"peft={request.param}", f"paths.artifacts={artifacts_dir}", f"hydra.run.dir={run_dir}"],
        run_dir,
    )
    out = run_dir / "export"
    written = main([str(run_dir), "--out", str(out), "--artifacts", str(artifacts_dir)])
    assert written == {role: out / role for role in ("actor", "reward_model", "critic")}
    return run_dir, out


def sandbox_stack(run_dir: Path, artifacts_dir: Path):
    """The run's four roles as the sandbox builds them, with its last checkpoint's weights."""
    run = locate(run_dir, artifacts_dir)
    critic_from = artifacts_dir / json.loads((run_dir / "summary.json").read_text())["artifacts"]["critic"]
    stack = build_policy_stack(run.sft, run.reward, critic_from, run.cfg.model)
    stack.load_trainable(run.checkpoint)
    return stack, load_tokenizer(run.sft), instantiate(run.cfg.task)


def test_the_exported_models_compute_what_the_sandbox_does(exported, artifacts_dir):
    run_dir, out = exported
    stack, tokenizer, task = sandbox_stack(run_dir, artifacts_dir)
    actor = AutoModelForCausalLM.from_pretrained(out / "actor").eval()
    reward, reward_tokenizer = reload(out / "reward_model")
    critic, _ = reload(out / "critic")
    assert AutoTokenizer.from_pretrained(out / "actor").get_vocab() == tokenizer.get_vocab()

    rows = task.sft_examples("eval")[:6]
    encoded = [encode_pair(tokenizer, row["prompt"], row["response"], 64)[:2] for row in rows]
    batch = pad_pairs(encoded, tokenizer.pad_token_id)  # the sandbox's layout: pads on both sides
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 0).any()
    sandbox = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}
    with torch.no_grad():
        expected_logits = stack.actor(**sandbox).logits
        torch.testing.assert_close(
            actor(**sandbox).logits[mask.bool()], expected_logits[mask.bool()], atol=1e-4, rtol=1e-4
        )
        scores = stack.reward.score(ids, mask)
        torch.testing.assert_close(reward(**sandbox).logits[:, 0], scores, atol=1e-4, rtol=1e-4)
        values = last_position(stack.critic(ids, mask), mask)
        torch.testing.assert_close(critic(**sandbox).logits[:, 0], values, atol=1e-4, rtol=1e-4)
        # as anyone would score text with the exported tokenizer: right-padded, no position ids
        texts = [f"{row['prompt']} {row['response']} {reward_tokenizer.eos_token}" for row in rows]
        plain = reward_tokenizer(texts, padding=True, return_tensors="pt")
        torch.testing.assert_close(reward(**plain).logits[:, 0], scores, atol=1e-4, rtol=1e-4)
    assert scores.std() > 0  # a trained reward model tells the responses apart
    # plain models, a LoRA run's adapters merged
    assert not list(out.glob("*/adapter_config.json")) and len(list(out.glob("*/model.safetensors"))) == 3


# --------------------------------------------------------------------------- what cannot be exported


def test_bad_sources_name_the_path_and_what_is_missing(exported, artifacts_dir, tmp_path):
    run_dir, _ = exported
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}/nowhere: no such folder"):
        locate(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError, match=rf"{re.escape(str(tmp_path))}: neither a checkpoint .* run folder"
    ):
        locate(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=rf"{re.escape(str(tmp_path))}/cache/sft-\w+: the run's sft artifact"
    ):
        locate(run_dir, tmp_path / "cache")
    checkpoint = locate(run_dir, artifacts_dir).checkpoint
    assert locate(checkpoint, artifacts_dir).checkpoint == checkpoint  # a checkpoint folder works too
    with pytest.raises(SystemExit, match=rf"error: {run_dir / 'export'}: not empty"):
        main([str(checkpoint), "--out", str(run_dir / "export"), "--artifacts", str(artifacts_dir)])


def test_a_mean_pooled_reward_model_is_refused(exported, artifacts_dir, tmp_path):
    run = locate(exported[0], artifacts_dir)
    mean_rm = tmp_path / "rm"
    ValueModel.from_causal_lm(run.sft, pooling="mean").save_pretrained(mean_rm)
    run.reward, run.has_critic = mean_rm, False
    with pytest.raises(ValueError, match=rf"{mean_rm}: the reward model pools by 'mean'"):
        check_exportable(run, ROLES)
    check_exportable(run, ["actor"])  # the policy alone still travels


def test_roles_choose_what_is_exported(exported, artifacts_dir, tmp_path):
    written = main(
        [
            str(exported[0]),
            "--out",
            str(tmp_path / "out"),
            "--artifacts",
            str(artifacts_dir),
            "--roles",
            "actor",
        ]
    )
    assert set(written) == {"actor"} and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["actor"]
    with pytest.raises(SystemExit, match="are not roles"):
        main(
            [
                str(exported[0]),
                "--out",
                str(tmp_path / "x"),
                "--artifacts",
                str(artifacts_dir),
                "--roles",
                "policy",
            ]
        )
