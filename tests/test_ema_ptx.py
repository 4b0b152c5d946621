"""EMA of the actor and PTX mixing: the update rule, the weight swap, the mixed loss, end to end."""

import pytest
import torch
from conftest import read_history, read_summary, run_entry
from test_run import SMALL
from torch import nn

from backbone.ema import EMA


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


def test_ptx_and_ema_run_end_to_end(tmp_path, artifacts_dir):
    run_dir = tmp_path / "run"
    run_entry(
        [
            *SMALL,
            "iterations=2",
            "ptx.coef=1.0",
            "ema.enabled=true",
            "logger.mode=disabled",
            f"paths.artifacts={artifacts_dir}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    rows = [r for r in read_history(run_dir) if "iteration" in r]
    assert all(r["train/ptx_loss"] > 0 for r in rows[1:])
    for row in (rows[0], rows[2]):
        assert {"eval/sft_loss", "eval_ema/reward_mean", "eval_ema/gold_mean", "eval_ema/sft_loss"} <= set(
            row
        )
    # at iteration 0 the EMA weights are the SFT weights: the same held-out SFT loss
    assert rows[0]["eval_ema/sft_loss"] == pytest.approx(rows[0]["eval/sft_loss"])
    summary = read_summary(run_dir)
    assert "final/eval_ema/gold_mean" in summary and "gain/eval/sft_loss" in summary
