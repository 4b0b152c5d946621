"""EMA of the actor and PTX mixing: the update rule, the weight swap, the mixed loss and where its
texts come from, end to end."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, read_history, read_summary, run_entry
from omegaconf import OmegaConf
from test_run import SMALL
from torch import nn

from backbone.artifacts import config_hash
from backbone.ema import EMA
from backbone.models import build_tiny_causal_lm, train_word_tokenizer
from backbone.ptx import PTXMixer
from backbone.stages import sft_config_key
from backbone.tasks.toy_reviews import N_NOTES, ToyReviews

CPU = torch.device("cpu")
SIZES = dict(
    n_sft_train=200, n_sft_eval=40, n_pref_train=100, n_pref_eval=20, n_rl_prompts=50, n_eval_prompts=8
)


def test_ema_update_follows_its_formula_and_evaluation_restores_the_live_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model.parameters(), decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for shadow, e in zip(ema.shadow, expected):
        torch.testing.assert_close(shadow, e)
    live = [p.detach().clone() for p in model.parameters()]
    with ema.applied():
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e)
    for p, saved in zip(model.parameters(), live):
        assert torch.equal(p.detach(), saved)
    with pytest.raises(ValueError, match=r"ema\.decay"):
        EMA(model.parameters(), decay=1.0)


def ptx_run(tmp_path: Path, artifacts_dir: Path, *overrides: str) -> tuple[Path, list[dict]]:
    """Two iterations with PTX mixed in at coefficient 1: the run folder and its RL rows, each
    training row with a positive mixed-in loss."""
    run_dir = tmp_path / "run"
    args = [*SMALL, "iterations=2", "ptx.coef=1.0", *overrides, "logger.mode=disabled"]
    run_entry([*args, f"paths.artifacts={artifacts_dir}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    rows = [r for r in read_history(run_dir) if "iteration" in r]
    assert all(r["train/ptx_loss"] > 0 for r in rows[1:])
    return run_dir, rows


def test_ptx_and_ema_run_end_to_end(tmp_path, artifacts_dir):
    run_dir, rows = ptx_run(tmp_path, artifacts_dir, "ema.enabled=true")
    for row in (rows[0], rows[2]):
        assert {"eval/sft_loss", "eval_ema/reward_mean", "eval_ema/gold_mean", "eval_ema/sft_loss"} <= set(
            row
        )
    # at iteration 0 the EMA weights are the SFT weights: the same held-out SFT loss
    assert rows[0]["eval_ema/sft_loss"] == pytest.approx(rows[0]["eval/sft_loss"])
    summary = read_summary(run_dir)
    assert "final/eval_ema/gold_mean" in summary and "gain/eval/sft_loss" in summary


# --------------------------------------------------------------------------- PTX's texts and loss


@pytest.fixture(scope="module")
def toy():
    task = ToyReviews(seed=0, **SIZES)
    return task, train_word_tokenizer(task.corpus())


def batch_texts(batch: dict[str, torch.Tensor], tokenizer) -> list[tuple[list[int], str]]:
    """Each row of a PTX batch: its unscored context and the text of its scored tokens."""
    rows = []
    for ids, attention, scored in zip(batch["input_ids"], batch["attention_mask"], batch["response_mask"]):
        context = ids[(attention == 1) & (scored == 0)].tolist()
        rows.append((context, tokenizer.decode(ids[scored == 1].tolist(), skip_special_tokens=True)))
    return rows


def test_pretrain_source_draws_only_the_pretraining_train_texts_and_scores_every_token(toy):
    task, tokenizer = toy
    train, held_out = set(task.pretrain_texts("train")), set(task.pretrain_texts("eval"))
    mixer = PTXMixer(task, tokenizer, 64, 1.0, "pretrain", 32, CPU, seed=0)
    for _ in range(140):  # more than one pass over the 4000 notes: the reshuffled stream too
        batch = mixer.next_batch()
        assert batch["input_ids"].shape[0] == 32
        for context, text in batch_texts(batch, tokenizer):
            # the context is the start token alone: every word of the note and its EOS are scored
            assert context == [tokenizer.eos_token_id] and text in train and text not in held_out
        scored = batch["input_ids"][batch["response_mask"] == 1]
        assert (scored == tokenizer.eos_token_id).sum() == 32  # one EOS closes each text
    # the SFT source reads demonstrations, with their prompts as unscored context
    sft = PTXMixer(task, tokenizer, 64, 1.0, "sft", 32, CPU, seed=0)
    responses = {ex["response"] for ex in task.sft_examples("train")}
    assert all(text in responses for _, text in batch_texts(sft.next_batch(), tokenizer))
    assert set(mixer.held_out) == {"sft_loss", "pretrain_loss"} and set(sft.held_out) == {"sft_loss"}


def test_pretrain_loss_is_next_token_loss_on_every_token(toy, monkeypatch):
    """The mixed-in loss and the held-out loss against a loop over each text's prefixes, unpadded."""
    task, tokenizer = toy
    texts = ["kettle : my kettle is black .", "it is a small lamp .", "lamp :"]  # 7, 6 and 2 words
    monkeypatch.setattr(task, "pretrain_texts", lambda split: list(texts))
    torch.manual_seed(0)
    model = build_tiny_causal_lm(
        tokenizer, SimpleNamespace(n_layer=1, n_embd=16, n_head=2, n_positions=32, dropout=0.0)
    ).eval()
    nll, n = 0.0, 0
    for text in texts:
        ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids.append(tokenizer.eos_token_id)
        for t in range(1, len(ids)):  # -log p(x_t | x_0..x_{t-1}), x_0 the start token
            with torch.no_grad():
                logits = model(torch.tensor([ids[:t]])).logits[0, -1]
            nll -= F.log_softmax(logits, -1)[ids[t]].item()
            n += 1
    assert n == 7 + 6 + 2 + 3  # every word and each text's EOS
    mixer = PTXMixer(task, tokenizer, 64, 1.0, "pretrain", 3, CPU, seed=0)
    with torch.no_grad():
        assert mixer.loss(model).item() == pytest.approx(nll / n, rel=1e-5)
    assert mixer.eval_losses(model, "eval")["eval/pretrain_loss"] == pytest.approx(nll / n, rel=1e-5)


def test_the_stream_position_resumes_exactly(toy):
    task, tokenizer = toy
    first = PTXMixer(task, tokenizer, 64, 1.0, "pretrain", 48, CPU, seed=3)
    for _ in range(90):  # into the second pass
        first.next_batch()
    state = first.state_dict()
    resumed = PTXMixer(task, tokenizer, 64, 1.0, "pretrain", 48, CPU, seed=3)
    resumed.load_state_dict(state)
    for _ in range(3):
        expected, got = first.next_batch(), resumed.next_batch()
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_ptx_from_the_pretraining_corpus_end_to_end(tmp_path, artifacts_dir):
    """The ptx row's setting: SFT on demonstrations and notes, PTX on the notes."""
    run_dir, rows = ptx_run(tmp_path, artifacts_dir, "sft.mix_pretrain=true", "ptx.source=pretrain")
    for row in (rows[0], rows[2]):
        assert {"eval/pretrain_loss", "eval/sft_loss"} <= set(row)
    assert "pretrain_loss" not in str(rows[1])  # evaluations only
    summary = read_summary(run_dir)
    assert {"gain/eval/pretrain_loss", "gain/eval/sft_loss"} <= set(summary)
    # the SFT policy learned the notes (a model that never saw them scores ~log(vocabulary) = 4.8 nats),
    # and RL's first evaluation scores that very policy on the same held-out notes
    sft = summary["sft"]
    assert sft["sft/pretrain_texts"] == N_NOTES["train"] and sft["sft/pretrain_eval_loss"] < 2.0
    assert rows[0]["eval/pretrain_loss"] == pytest.approx(sft["sft/pretrain_eval_loss"], rel=1e-4)
    assert rows[0]["eval/sft_loss"] == pytest.approx(sft["sft/eval_loss"], rel=1e-4)


def test_sft_without_the_notes_keeps_its_artifact_key():
    """sft.mix_pretrain=false is the SFT of before the knob: its artifacts (and what is built on
    them) keep their keys, and mixing the notes in is another artifact."""
    plain, mixed = (compose_config([f"sft.mix_pretrain={m}"]).sft for m in ("false", "true"))
    before = {k: v for k, v in OmegaConf.to_container(plain).items() if k != "mix_pretrain"}
    assert config_hash(sft_config_key(plain)) == config_hash(before)
    assert config_hash(sft_config_key(mixed)) != config_hash(before)
