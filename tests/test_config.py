"""The Hydra config: every option composes, and bad input fails at start-up naming the key."""

import subprocess
import sys

import pytest
from conftest import CONF, REPO, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf


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
