"""The Hydra config: every option composes, and bad input fails at start-up naming the key."""

import os
import subprocess
import sys

import pytest
from conftest import CONF, REPO, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from algorithms.ppo_sampled import Baseline
from algorithms.rrhf import RRHFMode
from backbone import config, tracking
from backbone.kl import ESTIMATORS
from backbone.models import DTYPES
from backbone.ptx import PTX_SOURCES
from backbone.reward import KL_COEF_UNITS, NORMALIZE_MODES
from backbone.rng import STAGE_SEEDS
from backbone.tasks.schemas import SCHEMAS


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group",
    ["task", "model", "algorithm", "rollout", "reward", "kl", "optim", "critic", "peft", "engine", "logger"],
)
def test_every_group_option_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "task" and option == "local_preferences":
            overrides.append("task.path=json")
        cfg = compose_config(overrides)
        OmegaConf.resolve(cfg)


def test_default_config_is_typed_by_the_schemas():
    cfg = compose_config()
    assert OmegaConf.get_type(cfg.algorithm).__name__ == "PPOGAEConfig"
    assert OmegaConf.get_type(cfg.task).__name__ == "ToyReviewsConfig"
    assert cfg.algorithm._target_ == "algorithms.ppo_gae.PPOGAE"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm.gamma=abc", "algorithm.gamma"),
        ("algorithm.no_such_knob=1", "algorithm.no_such_knob"),
        ("rollout.max_new_tokens=many", "rollout.max_new_tokens"),
        ("model.not_a_field=3", "model.not_a_field"),
    ],
)
def test_bad_key_or_type_fails_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])
    assert key in str(error.value)


def test_a_knob_of_another_algorithm_is_rejected():
    with pytest.raises(ConfigCompositionException, match=r"algorithm\.gamma"):
        compose_config(["algorithm=rrhf", "algorithm.gamma=0.9"])


def test_entry_point_reports_the_bad_key_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "algorithm.cliprange=wide", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "algorithm.cliprange" in result.stderr
    assert not (tmp_path / "history.jsonl").exists()


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("reward.normalize=bogus", "reward.normalize", "[none, rm_stats, running]"),
        ("critic.init=reward_max", "critic.init", "[reward, reward_last, reward_mean, sft]"),
        ("kl.estimator=k4", "kl.estimator", "[k1, k2, k3]"),
        ("engine.precision=fp8", "engine.precision", "[fp32, bf16, fp16]"),
        ("ptx.source=wiki", "ptx.source", "[sft, pretrain]"),
        ("algorithm=rrhf algorithm.mode=batch", "algorithm.mode", "[online, offline]"),
        ("pinned_stages=[task,rl]", "pinned_stages[1]", "[task, sft, reward_model]"),
    ],
)
def test_a_value_outside_a_keys_choices_fails_at_composition(override, key, allowed):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(override.split())
    message = str(error.value.__cause__)
    assert f"full_key: {key}" in message and f"expected one of {allowed}" in message


def test_choices_reach_code_as_the_strings_it_compares_with():
    cfg = compose_config(["reward.normalize=none", "pinned_stages=[sft]", "algorithm=ppo_sampled"])
    assert cfg.reward.normalize == "none" and {"none": 1}[cfg.reward.normalize] == 1
    assert f"{cfg.algorithm.baseline}" == "sampled_mean" and repr(cfg.pinned_stages[0]) == "'sft'"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert type(plain["reward"]["normalize"]) is str and plain["pinned_stages"] == ["sft"]


@pytest.mark.parametrize(
    ("choice", "names"),
    [
        (config.RowSchemaName, ["preference", *SCHEMAS]),
        (config.DType, DTYPES),
        (config.NormalizeMode, NORMALIZE_MODES),
        (config.KLCoefUnits, KL_COEF_UNITS),
        (config.KLEstimator, ESTIMATORS),
        (config.LoggerMode, tracking.MODES),
        (config.PTXSource, PTX_SOURCES),
        (Baseline, ["sampled_mean", "leave_one_out", "critic", "critic_coati"]),
        (RRHFMode, ["online", "offline"]),
        (config.PinnedStage, STAGE_SEEDS),
    ],
)
def test_a_schemas_choices_are_the_names_its_code_knows(choice, names):
    assert sorted(choice.__members__) == sorted(names)


def test_a_bad_choice_on_the_command_line_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "reward.normalize=bogus", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "expected one of [none, rm_stats, running]\n    full_key: reward.normalize" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no outputs/
