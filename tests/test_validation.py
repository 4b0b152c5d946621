"""Impossible configs fail at start-up, before any model loads, with one message naming the keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import compose_config, write_jsonl
from hydra.utils import instantiate

from backbone.validation import check_run_config, check_targets


def problems(overrides: list[str]) -> str:
    cfg = compose_config(overrides)
    with pytest.raises(ValueError) as error:
        check_run_config(cfg, instantiate(cfg.algorithm))
    return str(error.value)


def test_the_default_configs_pass():
    for algorithm in ("ppo_gae", "ppo_sampled", "rrhf"):
        cfg = compose_config([f"algorithm={algorithm}"])
        check_targets(cfg)
        check_run_config(cfg, instantiate(cfg.algorithm))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["rollout.min_new_tokens=30", "rollout.max_new_tokens=24"],
            "rollout.min_new_tokens=30 > rollout.max",
        ),
        (["algorithm.minibatch_size=65"], "algorithm.minibatch_size=65 is larger than the batch of 64"),
        # RRHF ranks the chosen response beside 4 samples: 64 + 16 rows per iteration
        (["algorithm=rrhf", "algorithm.include_chosen=true", "algorithm.minibatch_size=81"], "batch of 80"),
        (["algorithm=rrhf", "optim.critic_lr=1e-4"], "optim.critic_lr=0.0001: rrhf trains no critic"),
        (["algorithm=rrhf", "critic.init=sft"], "critic.init='sft': rrhf trains no critic"),
        (
            ["algorithm=ppo_sampled", "critic.init=reward_mean"],
            "critic.init='reward_mean': ppo_sampled trains",
        ),
        (["algorithm=ppo_sampled", "algorithm.vf_coef=1.0"], "algorithm.vf_coef=1.0: ppo_sampled trains no"),
        (["algorithm=ppo_sampled", "rollout.samples_per_iteration=30"], "not a multiple of algorithm.samp"),
        (["peft=lora_multi_adapter", "reward_model.init=base"], "reward_model.init='base': under peft=lora"),
        (["peft=lora_multi_adapter", "model.lora_target_modules=[]"], "peft.target_modules is empty"),
        (["checkpoint_every=0"], "checkpoint_every=0: must be at least 1"),
        (["engine=deepspeed_zero3", "ema.enabled=true"], "ema.enabled with ZeRO-3: the EMA keeps whole"),
        (["engine=deepspeed_zero1", "engine.zero_stage=0"], "DeepSpeed runs at ZeRO stage 1, 2 or 3"),
        (["engine=deepspeed_zero2", "engine.offload_param=true"], "offloaded at ZeRO stage 3 only"),
        (
            ["engine=deepspeed_zero2", "engine.deepspeed_config=/nowhere/ds.json"],
            "engine.deepspeed_config=/nowhere/ds.json: cannot be read (No such file or directory)",
        ),
        (
            ["engine.deepspeed_config=ds.json"],
            "engine.deepspeed_config=ds.json: read by engine=deepspeed_zero*",
        ),
    ],
)
def test_each_impossible_combination_is_named(overrides, message):
    assert message in problems(overrides)


def test_every_problem_is_in_one_message():
    text = problems(["rollout.min_new_tokens=30", "checkpoint_every=0", "algorithm.minibatch_size=65"])
    assert text.count("\n  - ") == 3


@pytest.mark.parametrize("baseline", ["critic", "critic_coati"])
@pytest.mark.parametrize("peft", ["none", "lora_multi_adapter"])
def test_a_critic_option_is_fine_where_there_is_a_critic(baseline, peft):
    """Either critic of ppo_sampled, started from a reward model of another pooling, in either stack."""
    overrides = [f"algorithm.baseline={baseline}", "algorithm.vf_coef=1.0", "critic.init=reward_mean"]
    cfg = compose_config(["algorithm=ppo_sampled", f"peft={peft}", *overrides])
    check_run_config(cfg, instantiate(cfg.algorithm))


def test_only_the_sandbox_classes_are_built_from_a_config():
    with pytest.raises(ValueError, match=r"task._target_='os.system': only classes of the packages"):
        check_targets(compose_config(["task._target_=os.system"]))


def test_a_bad_config_fails_before_any_stage_is_built(tmp_path):
    artifacts = tmp_path / "artifacts"
    args = ["rollout.min_new_tokens=99", f"paths.artifacts={artifacts}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "rollout.min_new_tokens=99 > rollout.max_new_tokens=24" in result.stderr
    assert not artifacts.exists()  # no SFT or reward model was started


def test_ptx_from_a_task_without_a_pretraining_corpus_fails_before_any_stage_is_built(tmp_path):
    """A preference task has pretraining texts only when task.pretrain names a text dataset."""
    rows = [{"prompt": f"q {i} :", "chosen": f"yes {i} .", "rejected": f"no {i} ."} for i in range(8)]
    data = {
        split: write_jsonl(tmp_path / f"{split}.jsonl", rows[i::2])
        for i, split in enumerate(("train", "test"))
    }
    artifacts = tmp_path / "artifacts"
    args = [
        "task=local_preferences",
        "task.path=json",
        f"task.data_files={{train: '{data['train']}', test: '{data['test']}'}}",
        "ptx.source=pretrain",
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "task 'preferences' has no pretraining texts in its train split" in result.stderr
    assert not artifacts.exists()
