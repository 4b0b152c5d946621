"""The benchmark through its entry point at a tiny size: what its JSON reports, never how fast."""

from __future__ import annotations

import json
import os

import pytest

from analysis.records import load_benchmarks
from experiments.benchmark import main

# the stage overrides of test_run.py, so the session's artifacts are shared with it
STAGES = [
    "task.n_sft_train=1500",
    "task.n_pref_train=1500",
    "task.n_eval_prompts=16",
    "sft.epochs=1",
    "reward_model.epochs=1",
]
RL = ["rollout.samples_per_iteration=8", "rollout.max_new_tokens=12", "algorithm.minibatch_size=8"]
EPS = 1e-3  # seconds: a phase's clock starts a few instructions before the row's wall clock is read


def positive(stats: dict) -> bool:
    return stats["n"] > 0 and 0 < stats["min"] <= stats["median"] <= stats["max"]


@pytest.fixture(scope="module")
def iteration_report(tmp_path_factory, artifacts_dir) -> dict:
    out = tmp_path_factory.mktemp("bench")
    argv = ["iteration", *STAGES, "--algorithms", "ppo_gae,ppo_sampled,rrhf", "--iterations", "2"]
    # Hydra overrides may also follow the options
    argv += ["--warmup", "1", *RL, f"paths.artifacts={artifacts_dir}", "--out", str(out)]
    path = main(argv)
    assert path.parent == out
    return json.loads(path.read_text())


def test_iteration_reports_every_phase_and_its_lower_bound(iteration_report):
    assert iteration_report["command"] == "iteration"
    assert iteration_report["machine"]["cpu_count"] > 0
    assert iteration_report["machine"]["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]  # conftest sets it
    results = {r["algorithm"]: r for r in iteration_report["results"]}
    assert list(results) == ["ppo_gae", "ppo_sampled", "rrhf"]
    for name, result in results.items():
        critic = name == "ppo_gae"
        shape = result["shape"]
        assert (shape["samples_per_iteration"], shape["minibatch_size"], shape["needs_critic"]) == (
            8,
            8,
            critic,
        )
        phases = result["phases"]
        rollout_parts = {"generate", "actor_forward", "reference_forward", "reward_forward", "gold"}
        rollout_parts |= {"critic_forward"} if critic else set()
        assert {f"time/rollout/{p}_s" for p in rollout_parts} | {"time/rollout_s", "time/update_s"} <= set(
            phases
        )
        assert ("time/rollout/critic_forward_s" in phases) == critic
        assert not any(k.startswith("time/eval") for k in phases), "evaluation is not part of an iteration"
        assert result["eval"]["time/eval_s"]["n"] == 2  # the SFT policy's and the last iteration's
        assert positive(result["iteration_s"]) and result["iteration_s"]["n"] == 2

        bound = result["lower_bound"]
        parts = {"generate_s", "reference_forward_s", "reward_forward_s", "update_s"}
        assert set(bound) == parts | {"total_s"} | ({"critic_forward_s"} if critic else set())
        assert all(positive(stats) for stats in bound.values())
        assert result["ratio"]["iteration"] == pytest.approx(
            result["iteration_s"]["median"] / bound["total_s"]["median"]
        )
        assert all(r > 0 for r in result["ratio"].values())
        assert all(positive(stats) for stats in result["tokens_per_s"].values())
        assert result["memory"]["peak_mb"] > 0

        for it in result["per_iteration"]:
            assert it["phases_top_level_sum_s"] <= it["iteration_s"] + EPS
            rollout_sum = sum(v for k, v in it["phases"].items() if k.startswith("time/rollout/"))
            assert rollout_sum <= it["phases"]["time/rollout_s"] + EPS
            total = it["lower_bound"]["total_s"]
            assert total == pytest.approx(sum(v for k, v in it["lower_bound"].items() if k != "total_s"))
            assert it["generated_tokens"] > 0 and it["training_tokens"] > 0


def test_sft_reports_real_tokens_per_second_padded_and_packed(tmp_path, artifacts_dir):
    argv = ["sft", *STAGES, "sft.batch_size=8", f"paths.artifacts={artifacts_dir}"]
    path = main([*argv, "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    padded, packed = report["modes"]
    assert (padded["packing"], packed["packing"]) == (False, True)
    assert packed["pad_fraction"] == 0 < padded["pad_fraction"]  # the first blocks are all full
    assert packed["steps_per_epoch"] < padded["steps_per_epoch"]
    for mode in (padded, packed):
        assert positive(mode["step_s"]) and mode["step_s"]["n"] == 2
        assert mode["real_tokens_per_s"] > 0 and mode["memory"]["peak_mb"] > 0
    assert report["speedup"] == pytest.approx(packed["real_tokens_per_s"] / padded["real_tokens_per_s"])


def test_memory_reports_both_storage_modes_in_the_files_analysis_reads(tmp_path, artifacts_dir):
    path = main(["memory", *STAGES, f"paths.artifacts={artifacts_dir}", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    results = {(r["mode"], r["gradient_checkpointing"]): r for r in report["results"]}
    modes = [("none", False), ("lora_multi_adapter", False), ("none", True), ("lora_multi_adapter", True)]
    assert list(results) == modes
    # one file per measurement with the fields analysis/claims reads (the report itself has no mode)
    files = [(r["mode"], r["gradient_checkpointing"]) for r in load_benchmarks([tmp_path]) if "mode" in r]
    assert sorted(files) == sorted(modes)
    for checkpointing in (False, True):
        full, lora = results["none", checkpointing], results["lora_multi_adapter", checkpointing]
        one = full["one_model_tensor_bytes"]
        assert 4 * one < full["tensor_bytes"] < 4.1 * one  # four models (and two small heads)
        assert one < lora["tensor_bytes"] < 1.25 * one  # one model (and adapters and heads)
        for result in (full, lora):
            assert result["one_model_bytes"] >= 0 and 0 <= result["peak_bytes"] <= result["update_peak_bytes"]
            assert result["one_model_train_bytes"] >= result["one_model_bytes"]  # a step holds more


def test_sweep_reports_jobs_per_hour_and_where_their_time_went(tmp_path, artifacts_dir):
    sweep = [
        "seed=0,1",
        "iterations=2",
        "logger.mode=disabled",
        "frontier.best_of_n=16",
        "frontier.prompts=4",
    ]
    argv = [
        "sweep",
        *STAGES,
        *RL,
        *sweep,
        f"paths.artifacts={artifacts_dir}",
        "--keep",
        str(tmp_path / "kept"),
    ]
    report = json.loads(main([*argv, "--out", str(tmp_path / "out")]).read_text())
    assert report["jobs"] == 2 and set(report["per_job"]) == {"0", "1"} and report["workers"] == 2
    assert report["jobs_per_hour"] == pytest.approx(3600 * 2 / report["wall_s"])
    for name, job in report["per_job"].items():
        summary = json.loads((tmp_path / "kept" / "sweep" / name / "summary.json").read_text())
        assert job["job"] == pytest.approx(summary["time/job_s"]) and job["rl"] == pytest.approx(
            summary["time/rl_s"]
        )
        assert min(job["stages"], job["best_of_n"], job["rest_of_job"]) > 0 and 0 < job["eval"] < job["rl"]
        assert job["job"] == pytest.approx(job["stages"] + job["best_of_n"] + job["rl"] + job["rest_of_job"])
    totals = report["totals_s"]
    assert totals["job"] == pytest.approx(sum(job["job"] for job in report["per_job"].values()))
    assert totals["outside_jobs"] == pytest.approx(report["wall_s"] * 2 - totals["job"])
