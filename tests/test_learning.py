"""Learning, not just running: on the built-in task each algorithm beats the SFT policy.

A short seeded run at the default sizes must raise both the reward model's score and the
task's gold reward on held-out prompts over iteration 0 (the SFT policy). Evaluation is
paired (the same held-out prompts, 4 samples each), so the margin below is several
standard errors of the measured gains (about +1 gold for PPO after 30 iterations; after 30,
GRPO gains +0.7 to +0.9 gold and RLOO +0.6 to +0.8 over seeds 0-2, and after 20 as little as
+0.3; RRHF moves less per sample, +0.1 to +0.3 gold after 30 and +0.6 to +0.8 after 60 over seeds 0-2, so it
gets 60). DPO offline (64 preference pairs an iteration) gains +0.4 to +0.8 gold and +2.0 to +2.9
reward after 60 over seeds 0-2, gold rising unevenly; online, +0.6 to +1.3 gold and +2.2 to +3.4
reward after 45 (after 30, as little as +0.3 gold). An algorithm's row may add overrides of its own.
"""

import pytest
from conftest import read_history, read_summary, run_entry

from algorithms import REGISTRY

ROWS = [
    ("ppo_gae", 30, []),
    ("ppo_sampled", 30, []),
    ("grpo", 30, []),
    ("rloo", 30, []),
    ("rrhf", 60, []),
    ("dpo", 60, []),
    ("dpo", 45, ["algorithm.mode=online"]),
]


def test_every_registered_algorithm_has_a_learning_row():
    assert {algorithm for algorithm, _, _ in ROWS} == set(REGISTRY)


@pytest.mark.parametrize(
    ("algorithm", "iterations", "overrides"),
    ROWS,
    ids=["ppo_gae", "ppo_sampled", "grpo", "rloo", "rrhf", "dpo", "dpo-online"],
)
def test_a_short_run_raises_reward_and_gold_over_the_sft_policy(
    algorithm, iterations, overrides, artifacts_dir, tmp_path
):
    run_dir = tmp_path / "run"
    run_entry(
        [
            f"algorithm={algorithm}",
            *overrides,
            f"iterations={iterations}",
            f"rollout.eval_every={iterations}",  # the gains compare the last evaluation with the first
            "logger.mode=disabled",
            "frontier.best_of_n=0",  # a learning test: the frontier's reference is tested on its own
            f"paths.artifacts={artifacts_dir}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    summary = read_summary(run_dir)
    evals = [r for r in read_history(run_dir) if "eval/reward_mean" in r]
    assert [r["iteration"] for r in evals] == [0, iterations]
    assert summary["reward_model"]["rm/eval_accuracy"] > 0.7
    assert summary["gain/eval/reward_mean"] > 0.2, summary
    assert summary["gain/eval/gold_mean"] > 0.2, summary
