"""The entry point as a user types it: run records, W&B groups, shared artifacts, determinism."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import read_history, read_summary, run_entry
from hydra.types import RunMode
from omegaconf import OmegaConf
from wandb_records import items_of, offline_records, offline_runs, records_of

from analysis.records import WANDB_STAGE_JOB_TYPES
from backbone.models import value_metadata
from experiments.job import STAGE_JOB_TYPES, named_overrides

# small enough to run in seconds; the stages still train a usable SFT policy and reward model
SMALL = [
    "task.n_sft_train=1500",
    "task.n_pref_train=1500",
    "task.n_eval_prompts=16",
    "sft.epochs=1",
    "reward_model.epochs=1",
    "rollout.samples_per_iteration=8",
    "rollout.max_new_tokens=12",
    "algorithm.minibatch_size=8",
    "rollout.eval_every=2",
    "logger.table_every=2",
    "frontier.best_of_n=16",
    "frontier.prompts=4",
]

RL_KEYS = {
    "iteration",
    "samples",
    "tokens",
    "time/elapsed_s",
    "rollout/reward_mean",
    "rollout/kl_mean",
    "rollout/kl_exact_mean",
    "rollout/response_len_mean",
    "rollout/gold_mean",
    "train/loss",
}
EVAL_KEYS = {"eval/reward_mean", "eval/kl_mean", "eval/kl_exact_mean", "eval/gold_mean"}


def rl_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "iteration" in r]


@pytest.fixture(scope="module")
def single_result(tmp_path_factory, artifacts_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """The default job, small (stdout and stderr redirected, as in a cluster job): its folder and output."""
    run_dir = tmp_path_factory.mktemp("single")
    args = [*SMALL, "iterations=3", f"paths.artifacts={artifacts_dir}", f"hydra.run.dir={run_dir}"]
    result = run_entry(args, cwd=run_dir)
    assert f"run record: {run_dir}" in result.stdout
    return run_dir, result


@pytest.fixture(scope="module")
def single_run(single_result) -> Path:
    return single_result[0]


def end_of_run_table(text: str) -> dict[str, list[str]]:
    """The end-of-run table in printed or logged text: measure -> its cells after the stage column."""
    lines = text[text.index("end of run") :].splitlines()[1:]
    header = lines[0].split()
    assert header == ["stage", "measure", "first", "final", "time"]
    table = {}
    for line in lines[1:]:
        if line.startswith("["):  # the next log line
            break
        stage, rest = (line[: len("reward model")].strip(), line[len("reward model") :].strip())
        measure, *values = [cell for cell in rest.split("  ") if cell]
        table[f"{stage}: {measure.strip()}"] = [v.strip() for v in values]
    return table


def test_history_rows_carry_the_contract_keys(single_run):
    rows = rl_rows(read_history(single_run))
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= EVAL_KEYS and "train/loss" not in rows[0]  # iteration 0: the SFT policy
    for row in rows[1:]:
        assert set(row) >= RL_KEYS
        assert {"train/policy_loss", "train/value_loss", "train/clipfrac", "train/approx_kl"} <= set(row)
    assert set(rows[2]) >= EVAL_KEYS and set(rows[3]) >= EVAL_KEYS  # every 2 iterations and the last
    samples = [r["samples"] for r in rows]
    assert samples == sorted(samples) and samples[-1] == 3 * 8
    assert rows[0]["eval/kl_mean"] == pytest.approx(0.0, abs=1e-4)  # actor == reference at the start


def test_summary_and_run_record(single_run):
    summary = read_summary(single_run)
    for key in (
        "algorithm",
        "seed",
        "task",
        "model",
        "iterations",
        "samples",
        "wall_time_s",
        "final/eval/reward_mean",
        "gain/eval/reward_mean",
        "gain/eval/gold_mean",
        "group",
    ):
        assert key in summary
    assert summary["algorithm"] == "ppo_gae" and summary["iterations"] == 3
    assert summary["cpu_threads"] == len(os.sched_getaffinity(0))  # one job alone: every core
    assert summary["reward_model"]["rm/eval_accuracy"] > 0.5
    assert (single_run / ".hydra" / "config.yaml").exists()
    assert list((single_run / "checkpoints").glob("iter-*/actor/model.safetensors"))
    assert list((single_run / "wandb").glob("offline-run-*/run-*.wandb"))  # offline by default
    assert (single_run / "tables" / "eval" / "samples.jsonl").exists()


def test_the_end_of_run_table_reads_the_run_record(single_result):
    """Printed at the end, in run.log and in the W&B summary: the record's numbers, final = last eval."""
    run_dir, result = single_result
    summary = read_summary(run_dir)
    sft, rm = summary["sft"], summary["reward_model"]
    expected = {
        "SFT: held-out loss": [sft["sft/eval_loss"]],
        "reward model: held-out accuracy": [rm["rm/eval_accuracy"]],
        "reward model: gold agreement (Spearman)": [rm["rm/eval_spearman"]],
    }
    for name, key in [("proxy reward", "reward_mean"), ("gold", "gold_mean"), ("KL", "kl_mean")]:
        key = f"eval/{key}"
        expected[f"RL: {name} ({key})"] = [summary[f"initial/{key}"], summary[f"final/{key}"]]
    # the last evaluation is the last history row with one
    last_eval = [r for r in read_history(run_dir) if "eval/gold_mean" in r][-1]
    assert summary["final/eval/gold_mean"] == last_eval["eval/gold_mean"]
    for text in (result.stdout, (run_dir / "run.log").read_text()):
        table = end_of_run_table(text)
        assert table.keys() >= expected.keys()
        for measure, values in expected.items():
            printed = [float(v) for v in table[measure][: len(values)]]
            assert printed == pytest.approx(values, abs=5e-4), measure
        # each stage's time: SFT and RM were built by this run or read from the cache
        assert table["RL: proxy reward (eval/reward_mean)"][2] == f"{summary['wall_time_s']:.1f} s"
        assert table["SFT: held-out loss"][1].startswith(f"{sft['sft/wall_time_s']:.1f} s")
    (path,) = run_dir.glob("wandb/offline-run-*/files/media/table/end_of_run*.table.json")
    sent = json.loads(path.read_text())
    finals = {f"{row[0]}: {row[1]}": row[3] for row in sent["data"]}
    assert finals["RL: gold (eval/gold_mean)"] == summary["final/eval/gold_mean"]
    assert finals["reward model: held-out accuracy"] == rm["rm/eval_accuracy"]


def test_progress_bars_stay_quiet_in_a_redirected_log(single_result):
    """Off a terminal each stage's bar is drawn a few times (start, end, once a minute), not per step."""
    run_dir, result = single_result
    rows = read_history(run_dir)
    # a stage read from the session's artifact cache (another test built it) draws no bar
    built = [stage for stage in ("sft", "rm") if any(f"{stage}/step" in row for row in rows)]
    for desc in (*built, "ppo_gae"):
        draws = [line for line in re.split(r"[\r\n]", result.stderr) if line.startswith(f"{desc}:")]
        assert 1 <= len(draws) <= 5, (desc, draws)


def test_multirun_jobs_share_a_group_and_the_stage_artifacts(tmp_path):
    """seed=0,1 under seed_scope=pipeline builds every stage once per seed; under rl they share one."""
    artifacts = tmp_path / "artifacts"
    sweep = tmp_path / "sweep"
    result = run_entry(
        [
            "-m",
            *SMALL,
            "iterations=1",
            "seed_scope=pipeline,rl",
            "seed=0,1",
            f"paths.artifacts={artifacts}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    summaries = [
        read_summary(sweep / str(i)) for i in range(4)
    ]  # (pipeline, 0), (pipeline, 1), (rl, 0), (rl, 1)
    # the end-of-sweep report, once, after the basic launcher's last job
    assert result.stdout.count(f"sweep report: {sweep / 'report' / 'report.md'}") == 1
    assert {s["group"] for s in summaries} == {f"{sweep.parent.name}_{sweep.name}"}
    assert [s["seed"] for s in summaries] == [0, 1, 0, 1]
    assert len({s["run_id"] for s in summaries}) == 4
    used = [s["artifacts"] for s in summaries]
    assert used[0] == used[2] == used[3]  # seed 0 of both scopes, and seed 1 under rl: one SFT and RM
    assert used[1]["sft"] != used[0]["sft"] and used[1]["reward"] != used[0]["reward"]
    built = sorted(p.name.split("-")[0] for p in artifacts.iterdir() if p.is_dir())
    # seed 1 under pipeline builds its own stages (and best-of-n reference)
    assert built == ["base", "base", "best_of_n", "best_of_n", "reward", "reward", "sft", "sft"]
    group = summaries[0]["group"]
    for i, summary in enumerate(summaries):  # what W&B received (offline run records)
        records = offline_records(sweep / str(i), summary["run_id"])
        (wandb_run,) = records_of(records, "run")
        assert (wandb_run.run_group, wandb_run.job_type, wandb_run.display_name) == (
            group,
            "ppo_gae",
            f"seed={i % 2},seed_scope={['pipeline', 'rl'][i // 2]}",  # the swept values, not SMALL's
        )
        assert summary["name"] == wandb_run.display_name
        assert items_of(wandb_run.config.update)["seed"] == i % 2
        history = [items_of(h.item) for h in records_of(records, "history")]
        metric_rows = [h for h in history if "eval/reward_mean" in h or "train/loss" in h]  # not tables
        assert [(h["iteration"], h["samples"]) for h in metric_rows] == [(0, 0), (1, 8)]
        # every RL run uses its stage artifacts, built by itself or by another job (the critic starts
        # from the reward model: the same artifact)
        assert summary["artifacts"] == {**used[i], "critic": used[i]["reward"]}
        uses = {a.name: a.digest for a in records_of(records, "artifact") if a.use_after_commit}
        assert set(uses) == {used[i]["sft"], used[i]["reward"]}
        assert all("iteration" in row for row in read_history(sweep / str(i)))  # stage rows: their own runs
    # job 0 built seed 0's stages: each a W&B run of its own, beside its RL run, that makes its artifact
    # (the reward model's from the SFT model's); job 2 reused them and holds only its RL run
    stage_runs = {
        records_of(records, "run")[0].job_type: records
        for run_id, records in offline_runs(sweep / "0").items()
        if run_id != summaries[0]["run_id"]
    }
    assert set(stage_runs) == {"sft", "reward_model"}
    assert list(offline_runs(sweep / "2")) == [summaries[2]["run_id"]]
    stages = (("sft", "sft", "sft", ["base"]), ("reward_model", "reward", "rm", ["sft"]))
    for job_type, kind, prefix, inputs in stages:
        records = stage_runs[job_type]
        (wandb_run,) = records_of(records, "run")
        assert (wandb_run.display_name, wandb_run.run_group) == (used[0][kind], group)
        made = [a for a in records_of(records, "artifact") if not a.use_after_commit]
        assert [(a.name, a.type) for a in made] == [(used[0][kind], "model")]
        assert made[0].manifest.contents[0].ref.startswith((artifacts / used[0][kind]).as_uri())
        if kind == "reward":  # the version RL runs use is the one made here
            assert made[0].digest == uses_of(sweep / "2", summaries[2]["run_id"])[used[0]["reward"]]
        started = [a.name.split("-")[0] for a in records_of(records, "artifact") if a.use_after_commit]
        assert started == inputs
        sent = {
            k: v for summary in records_of(records, "summary") for k, v in items_of(summary.update).items()
        }
        assert sent[f"{prefix}/wall_time_s"] > 0  # the stage's metrics.json as its summary
        local = read_history(sweep / "0" / "stages" / used[0][kind])  # its own local record
        steps = [row[f"{prefix}/step"] for row in local]
        assert steps[0] == 0 and steps == sorted(steps)


def uses_of(run_dir: Path, run_id: str) -> dict[str, str]:
    return {
        a.name: a.digest
        for a in records_of(offline_records(run_dir, run_id), "artifact")
        if a.use_after_commit
    }


def test_same_seed_gives_the_same_history(tmp_path, artifacts_dir, single_run):
    run_dir = tmp_path / "again"
    run_entry(
        [*SMALL, "iterations=3", f"paths.artifacts={artifacts_dir}", f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )

    def stripped(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rl_rows(rows)]

    assert stripped(read_history(run_dir)) == stripped(read_history(single_run))


@pytest.mark.parametrize(
    ("overrides", "train_key"),
    [
        (["algorithm=ppo_sampled", "algorithm.baseline=critic"], "train/value_loss"),
        (["algorithm=ppo_sampled", "algorithm.baseline=critic_coati"], "train/value_loss"),
        (["algorithm=ppo_sampled", "algorithm.baseline=leave_one_out"], "train/baseline_mean"),
        (["algorithm=rrhf", "algorithm.mode=offline"], "train/rank_loss"),
        (["algorithm=rrhf", "algorithm.include_chosen=true"], "train/rank_loss"),
        (["kl.coef_units=reward_std", "reward.normalize=none", "kl.coef=0.1"], "train/value_loss"),
    ],
)
def test_algorithm_variants_run_end_to_end(overrides, train_key, tmp_path, artifacts_dir):
    run_dir = tmp_path / "run"
    run_entry(
        [
            *SMALL,
            *overrides,
            "iterations=2",
            "logger.mode=disabled",
            f"paths.artifacts={artifacts_dir}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    rows = rl_rows(read_history(run_dir))
    assert all(train_key in r for r in rows[1:])
    if "algorithm=ppo_sampled" in overrides:  # every baseline: the raw advantages' std
        assert all(r["train/advantage_std"] > 0 for r in rows[1:])
    if "kl.coef_units=reward_std" in overrides:  # 0.1 reward standard deviations of the raw scores
        rm_std = read_summary(run_dir)["reward_model"]["rm/chosen_std"]
        assert all(r["kl/coef"] == pytest.approx(0.1 * rm_std) for r in rows[1:])
    if "algorithm.mode=offline" in overrides:
        # the whole sample budget comes from the initial policy, before the first update
        assert [r["samples"] for r in rows] == [0, 16, 16]
    else:
        assert [r["samples"] for r in rows] == [0, 8, 16]


def test_a_critic_from_the_mean_pooled_reward_model_keeps_the_last_token_reward(
    tmp_path, artifacts_dir, single_run
):
    """critic.init=reward_mean builds a mean-pooled reward model for the critic; the reward is still the
    last-token one: the same artifact and, before any update, the same scores as the default run's."""
    run_dir = tmp_path / "run"
    args = [*SMALL, "critic.init=reward_mean", "iterations=1", "logger.mode=disabled"]
    run_entry([*args, f"paths.artifacts={artifacts_dir}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    artifacts, default = read_summary(run_dir)["artifacts"], read_summary(single_run)["artifacts"]
    assert artifacts["reward"] == default["reward"] == default["critic"]
    assert artifacts["critic"] != artifacts["reward"]
    assert value_metadata(artifacts_dir / artifacts["reward"])["pooling"] == "last"
    assert value_metadata(artifacts_dir / artifacts["critic"])["pooling"] == "mean"
    ours, theirs = rl_rows(read_history(run_dir)), rl_rows(read_history(single_run))
    for key, row in (("eval/reward_mean", 0), ("rollout/reward_mean", 1)):
        assert ours[row][key] == theirs[row][key], key


def test_analysis_knows_the_stage_runs_job_types():
    assert tuple(STAGE_JOB_TYPES.values()) == WANDB_STAGE_JOB_TYPES  # it leaves them out of a group's jobs


def test_a_run_is_named_after_the_values_that_tell_its_sweep_jobs_apart(tmp_path):
    """Hydra's override_dirname form, less bookkeeping and less what the sweep gives every job alike: its
    command line's single values (multirun.yaml) and its sweeper's fixed params (an experiment's)."""
    command_line = [
        "+experiment=kl_penalty",
        "iterations=5",
        "seed=0,1",
        "paths.artifacts=/a",
        "pinned_stages=[task]",
    ]
    (tmp_path / "multirun.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"overrides": {"task": command_line}}})
    )
    job = [
        "+experiment=kl_penalty",
        "iterations=5",
        "seed=1",
        "paths.artifacts=/a",
        "pinned_stages=[task]",
        "algorithm=ppo_gae",
        "kl.coef=0.05",
        "total_samples=3840",
        "logger.group=g",
    ]
    hydra_cfg = OmegaConf.create(
        {
            "mode": RunMode.MULTIRUN,
            "sweep": {"dir": str(tmp_path)},
            "sweeper": {"params": {"algorithm": "ppo_gae", "kl.coef": "0.0,0.05", "total_samples": 3840}},
            "overrides": {"task": job},
        }
    )
    assert named_overrides(hydra_cfg) == ["kl.coef=0.05", "seed=1"]
    hydra_cfg.mode = RunMode.RUN  # one run: every value it was given but bookkeeping and fixed params
    assert named_overrides(hydra_cfg) == ["iterations=5", "kl.coef=0.05", "pinned_stages=[task]", "seed=1"]
