"""SFT packing (``sft.packing``): blocks hold every token once, in order, closed examples, no padding;
the loss stays on response tokens; packed SFT learns the built-in task at tiny size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from backbone.models import build_tiny_causal_lm, encode_pair, train_word_tokenizer
from backbone.stages import build_base, sft_loss, sft_train_rows, train_sft

TINY = [
    "task.n_sft_train=400",
    "task.n_sft_eval=64",
    "task.n_pref_train=8",
    "task.n_pref_eval=8",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "sft.batch_size=8",
    "sft.eval_every=1000",
    "engine.device=cpu",
]


@pytest.fixture(scope="module")
def task_and_pairs():
    task = instantiate(compose_config(TINY).task)
    tokenizer = train_word_tokenizer(task.corpus())
    rows = task.sft_examples("train")[:40]
    pairs = [encode_pair(tokenizer, r["prompt"], r["response"], max_length=64)[:2] for r in rows]
    return tokenizer, pairs


def test_blocks_hold_every_token_once_in_order_with_eos_separators(task_and_pairs):
    tokenizer, pairs = task_and_pairs
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    blocks, collate = sft_train_rows(pairs, packing=True, max_length=32, pad=pad)

    stream = [t for ids, _ in blocks for t in ids]
    assert stream == [t for prompt, response in pairs for t in (*prompt, *response)]
    assert all(len(ids) == 32 for ids, _ in blocks[:-1]) and 0 < len(blocks[-1][0]) <= 32
    assert pad not in stream
    # an EOS closes every example and appears nowhere else: the separators
    ends, end = [], -1
    for prompt, response in pairs:
        end += len(prompt) + len(response)
        ends.append(end)
    assert [i for i, t in enumerate(stream) if t == eos] == ends
    # the loss mask is the padded path's: response tokens (EOS included) only
    loss_mask = [m for _, mask in blocks for m in mask]
    assert loss_mask == [m for prompt, response in pairs for m in (*[0] * len(prompt), *[1] * len(response))]

    batch = collate(blocks)
    assert batch["input_ids"].shape == (len(blocks), 32)
    assert int(batch["attention_mask"].sum()) == len(stream)  # only the short last block is padded
    assert torch.equal(batch["response_mask"].flatten()[: len(stream)], torch.tensor(loss_mask))


def test_packed_loss_scores_the_response_tokens_the_padded_loss_scores(task_and_pairs):
    """Both paths score response tokens only; packing loses those that open a block (no context)."""
    tokenizer, pairs = task_and_pairs
    torch.manual_seed(0)
    arch = SimpleNamespace(n_layer=1, n_embd=16, n_head=2, n_positions=64, dropout=0.0)
    model = build_tiny_causal_lm(tokenizer, arch).eval()
    counts = {}
    for packing in (False, True):
        rows, collate = sft_train_rows(pairs, packing, max_length=32, pad=tokenizer.pad_token_id)
        with torch.no_grad():
            _, n = sft_loss(model, collate(rows))
        counts[packing] = int(n)
    blocks, _ = sft_train_rows(pairs, True, max_length=32, pad=tokenizer.pad_token_id)
    assert counts[False] == sum(len(response) for _, response in pairs)
    assert counts[True] == counts[False] - sum(mask[0] for _, mask in blocks)


def test_packed_sft_learns_the_toy_task(tmp_path):
    cfg = compose_config([*TINY, "sft.epochs=10", "sft.packing=true", f"paths.artifacts={tmp_path}"])
    task = instantiate(cfg.task)
    rows: list[dict] = []
    metrics = train_sft(cfg, task, build_base(cfg, task), tmp_path / "sft", rows.append)
    initial = next(r["sft/eval_loss"] for r in rows if r["sft/step"] == 0)
    train_losses = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert metrics["sft/eval_loss"] < 0.6 * initial
    assert sum(train_losses[-5:]) < sum(train_losses[:5])
