"""The one-base LoRA policy stack (``peft=lora_multi_adapter``): the same outputs as separate full
models while its adapters are zero, the reference as the base with adapters disabled, updates that
reach only the actor's and critic's adapters, exact save and restore; then whole runs and a resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_checkpointed_loss_pass_matches, read_history, read_summary, run_entry
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from test_ppo_gae import make_algorithm
from test_resume import comparable, fault_run
from test_run import SMALL

from backbone.checkpoint import restore_weights
from backbone.ema import EMA
from backbone.lora import LoraPolicyStack, adapter_parameters, add_lora
from backbone.models import (
    PolicyStack,
    ValueModel,
    build_tiny_causal_lm,
    load_causal_lm,
    load_tokenizer,
    train_word_tokenizer,
    value_metadata,
)
from backbone.reward import RewardShaper
from backbone.roles import build_policy_stack
from backbone.rollout import RolloutCollector
from backbone.tasks.toy_reviews import ToyReviews

ARCH = SimpleNamespace(n_layer=1, n_embd=32, n_head=2, n_positions=48, dropout=0.0)
PEFT = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["c_attn"])
MODEL = SimpleNamespace(dtype="float32", trust_remote_code=False, gradient_checkpointing=False)
# the actor's log-probs from the loss's own pass: the comparisons with full models below are exact
ROLLOUT = SimpleNamespace(
    max_new_tokens=10, min_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0, logprobs="forward"
)


def randomize(params: list[torch.nn.Parameter], seed: int) -> None:
    """Non-zero adapter weights: a trained adapter, as far as these tests can tell."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def task() -> ToyReviews:
    return ToyReviews(n_sft_train=200, n_sft_eval=10, n_pref_train=200, n_pref_eval=10, n_rl_prompts=50)


@pytest.fixture(scope="module")
def sft(tmp_path_factory, task) -> Path:
    """A tiny SFT model as the SFT stage saves it (full weights)."""
    path = tmp_path_factory.mktemp("sft")
    tokenizer = train_word_tokenizer(task.corpus())
    torch.manual_seed(0)
    build_tiny_causal_lm(tokenizer, ARCH).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reward_artifact(sft: Path, folder: Path, trained: bool, pooling: str = "last", seed: int = 1) -> Path:
    """A LoRA reward model as the reward-model stage saves it: adapter (random when ``trained``, else
    LoRA's zero start) and head."""
    torch.manual_seed(seed)
    rm = ValueModel.from_causal_lm(sft, pooling)
    rm.body = add_lora(rm.body, PEFT)
    if trained:
        randomize(adapter_parameters(rm.body, "default"), seed=seed + 1)
    rm.save_pretrained(folder, chosen_mean=0.5, chosen_std=2.0)
    return folder


@pytest.fixture(scope="module")
def trained_rm(sft, tmp_path_factory) -> Path:
    return reward_artifact(sft, tmp_path_factory.mktemp("rm"), trained=True)


@pytest.fixture(scope="module")
def zero_rm(sft, tmp_path_factory) -> Path:
    return reward_artifact(sft, tmp_path_factory.mktemp("rm0"), trained=False)


def collect(stack: PolicyStack, sft: Path, task: ToyReviews, seed: int = 0):
    """Eight sampled responses, scored, with the critic's values when the stack has one."""
    shaper = RewardShaper(normalize="none", clip=None, missing_eos_penalty=None)
    collector = RolloutCollector(
        stack, load_tokenizer(sft), task, shaper, "k1", ROLLOUT, 48, torch.device("cpu")
    )
    torch.manual_seed(seed)
    return collector.collect(task.rl_prompts()[:8], with_values=stack.critic is not None, kl_coef=0.05)


def requires_grad_by_adapter(stack: LoraPolicyStack) -> dict[str, bool]:
    peft = stack.adapters.peft
    return {name: all(p.requires_grad for p in adapter_parameters(peft, name)) for name in peft.peft_config}


def snapshot(stack: LoraPolicyStack) -> dict[str, torch.Tensor]:
    """Every weight of the stack: the base and its three adapters, the critic's and the reward's heads."""
    named = dict(stack.named_parameters())
    named.update({f"reward_head.{n}": p for n, p in stack.reward.head.named_parameters()})
    return named


def test_one_base_holds_every_role_and_only_actor_and_critic_train(sft, trained_rm):
    stack = build_policy_stack(sft, trained_rm, trained_rm, MODEL)
    assert isinstance(stack, LoraPolicyStack)
    assert set(stack.adapters.peft.peft_config) == {"actor", "critic", "reward"}
    assert requires_grad_by_adapter(stack) == {"actor": True, "critic": True, "reward": False}
    groups = stack.parameter_groups(1e-3, 5e-4)
    assert [g["name"] for g in groups] == ["actor", "critic"] and groups[1]["lr"] == 5e-4
    trainable = {id(p) for p in stack.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}
    # one model's weights, plus adapters and heads of a few percent of it
    one_model = sum(p.numel() for p in load_causal_lm(sft).parameters())
    held = sum(p.numel() for p in snapshot(stack).values())
    assert one_model < held < 1.1 * one_model


@pytest.mark.parametrize("values_per", ["token", "sequence"])
@pytest.mark.parametrize("critic_init", ["reward", "sft"])
def test_zero_adapters_give_the_outputs_of_separate_full_models(sft, zero_rm, task, critic_init, values_per):
    critic_from = {"reward": zero_rm, "sft": sft}[critic_init]
    stack = build_policy_stack(sft, zero_rm, critic_from, MODEL, values_per)
    # full models on the same SFT base, with the LoRA roles' heads
    reward, critic = ValueModel.from_causal_lm(sft), ValueModel.from_causal_lm(sft)
    reward.load_head(zero_rm)
    critic.head.load_state_dict(stack.critic.head.state_dict())
    full = PolicyStack(load_causal_lm(sft), load_causal_lm(sft), reward, critic, values_per=values_per)
    rollouts = collect(stack, sft, task)
    torch.testing.assert_close(rollouts.logprobs, full.old_logprobs(rollouts), rtol=0, atol=0)
    torch.testing.assert_close(rollouts.ref_logprobs, full.reference_logprobs(rollouts), rtol=0, atol=0)
    assert torch.all(rollouts.kl == 0)  # a fresh actor adapter is the reference
    torch.testing.assert_close(rollouts.scores, full.score(rollouts), rtol=0, atol=0)
    torch.testing.assert_close(rollouts.values, full(rollouts, values=True).values.detach(), rtol=0, atol=0)


def test_a_critic_adapter_starts_from_a_reward_model_of_another_pooling(sft, trained_rm, task, tmp_path):
    """critic.init=reward_mean under LoRA: the critic is the mean-pooled artifact's adapter and head, the
    reward the last-token artifact's, and the scores are the last-token reward model's alone."""
    mean_rm = reward_artifact(sft, tmp_path / "mean", trained=True, pooling="mean", seed=7)
    stack = build_policy_stack(sft, trained_rm, mean_rm, MODEL, "sequence")
    assert (stack.reward.pooling, stack.critic.pooling) == ("last", "mean")
    for role, model, folder in (("critic", stack.critic, mean_rm), ("reward", stack.reward, trained_rm)):
        saved = load_file(folder / "adapter_model.safetensors")
        ours = get_peft_model_state_dict(stack.adapters.peft, adapter_name=role)
        assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in saved), role
        head = load_file(folder / "value_head.safetensors")
        assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items()), role
    assert requires_grad_by_adapter(stack) == {"actor": True, "critic": True, "reward": False}
    rollouts = collect(stack, sft, task)
    assert rollouts.values.shape == (8,)  # one value per sequence
    reward_only = build_policy_stack(sft, trained_rm, None, MODEL)
    torch.testing.assert_close(rollouts.scores, reward_only.score(rollouts), rtol=0, atol=0)


def test_the_reference_is_the_base_with_adapters_disabled(sft, trained_rm, task):
    stack = build_policy_stack(sft, trained_rm, trained_rm, MODEL)
    randomize(adapter_parameters(stack.adapters.peft, "actor"), seed=3)
    rollouts = collect(stack, sft, task)
    base = PolicyStack(load_causal_lm(sft), load_causal_lm(sft), ValueModel.from_causal_lm(sft))
    torch.testing.assert_close(rollouts.ref_logprobs, base.reference_logprobs(rollouts), rtol=0, atol=0)
    assert not torch.allclose(rollouts.logprobs, rollouts.ref_logprobs)  # the actor's adapter is on
    # leaving disable_adapter() left PEFT with only the active adapter trainable; the stack undid it
    assert requires_grad_by_adapter(stack) == {"actor": True, "critic": True, "reward": False}
    assert stack.adapters.peft.active_adapter == "actor"


def test_an_update_reaches_only_the_actor_and_critic_adapters(sft, trained_rm, task):
    stack = build_policy_stack(sft, trained_rm, trained_rm, MODEL)
    algorithm = make_algorithm(lr=1e-2, ppo_epochs=1, minibatch_size=8)
    groups = stack.parameter_groups(1e-2)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in snapshot(stack).items()}
    loss, _ = algorithm.loss(stack, algorithm.prepare(collect(stack, sft, task)))
    loss.backward()
    optimizer.step()
    trained = {id(p) for g in groups for p in g["params"]}
    for name, p in snapshot(stack).items():
        if id(p) in trained:
            assert p.grad is not None, f"{name} got no gradient"
        else:
            assert p.grad is None and torch.equal(p, before[name]), f"{name} is frozen but changed"
    changed = {n for n, p in snapshot(stack).items() if not torch.equal(p, before[n])}
    # the actor's lora_A has zero gradient while its lora_B is still zero (LoRA's start)
    assert {n for n in changed if ".actor." in n} == {n for n in before if "lora_B.actor" in n}
    assert {n for n in changed if ".critic." in n or n.startswith("critic.head")} == {
        n for n in before if ".critic." in n or n.startswith("critic.head")
    }


def test_gradient_checkpointing_on_the_shared_base(sft, trained_rm, task):
    plain = build_policy_stack(sft, trained_rm, trained_rm, MODEL)
    checkpointed = build_policy_stack(
        sft, trained_rm, trained_rm, SimpleNamespace(**{**vars(MODEL), "gradient_checkpointing": True})
    )
    assert_checkpointed_loss_pass_matches(plain, checkpointed, collect(plain, sft, task))


def test_the_ema_follows_the_actor_adapter_alone(sft, trained_rm, task):
    stack = build_policy_stack(sft, trained_rm, None, MODEL)
    adapter = adapter_parameters(stack.adapters.peft, "actor")
    ema = EMA(stack.role_parameters("actor"), decay=0.5)
    assert sum(e.numel() for e in ema.shadow) == sum(p.numel() for p in adapter)  # no copy of the base
    rollouts = collect(stack, sft, task)
    start = stack.old_logprobs(rollouts)  # the zero adapter: the SFT model
    randomize(adapter, seed=3)
    ema.update()  # half-way between the zero start and the new weights
    live = stack.old_logprobs(rollouts)
    with ema.applied():
        averaged = stack.old_logprobs(rollouts)
    assert torch.equal(stack.old_logprobs(rollouts), live)
    assert not torch.allclose(averaged, live) and not torch.allclose(averaged, start)
    assert torch.equal(stack.reference_logprobs(rollouts), start)


def test_saved_trainable_weights_restore_exactly_into_a_fresh_stack(sft, trained_rm, tmp_path):
    stack = build_policy_stack(sft, trained_rm, sft, MODEL)
    peft = stack.adapters.peft
    randomize([*adapter_parameters(peft, "actor"), *adapter_parameters(peft, "critic")], seed=4)
    randomize(list(stack.critic.head.parameters()), seed=5)
    stack.save_trainable(tmp_path)
    assert {"adapter_model.safetensors", "value_head.safetensors"} <= {
        p.name for p in (tmp_path / "critic").iterdir()
    }
    assert (tmp_path / "actor" / "adapter_model.safetensors").exists()

    fresh = build_policy_stack(sft, trained_rm, sft, MODEL)
    before = {n: p.detach().clone() for n, p in snapshot(fresh).items()}
    restore_weights(fresh, tmp_path)
    assert all(torch.equal(p, snapshot(stack)[n]) for n, p in snapshot(fresh).items())
    assert {n for n, p in snapshot(fresh).items() if not torch.equal(p, before[n])} == {
        n for n in before if ".actor." in n or ".critic." in n or n.startswith("critic.head")
    }


# --------------------------------------------------------------------------- whole runs

LORA = [*SMALL, "peft=lora_multi_adapter", "logger.mode=disabled"]


def lora_args(artifacts_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*LORA, f"paths.artifacts={artifacts_dir}", f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def ppo_gae_run(tmp_path_factory, artifacts_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("lora_ppo_gae")
    run_entry(lora_args(artifacts_dir, run_dir, "iterations=2", "checkpoint_every=1"), cwd=run_dir)
    return run_dir


def test_ppo_gae_runs_end_to_end_on_adapters(ppo_gae_run, artifacts_dir):
    rows = [r for r in read_history(ppo_gae_run) if "iteration" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # collected before the first update: actor == reference (up to the rounding of generation's logits)
    assert rows[1]["rollout/kl_mean"] == pytest.approx(0, abs=1e-5)
    assert {"train/policy_loss", "train/value_loss"} <= set(rows[2])
    checkpoint = ppo_gae_run / "checkpoints" / "iter-000002"
    assert (checkpoint / "actor" / "adapter_model.safetensors").exists()
    assert (checkpoint / "critic" / "value_head.safetensors").exists()
    assert not (checkpoint / "actor" / "model.safetensors").exists()
    assert any((rm / "adapter_config.json").exists() for rm in artifacts_dir.glob("reward-*"))


def test_rrhf_runs_end_to_end_on_adapters(tmp_path, artifacts_dir):
    run_entry(lora_args(artifacts_dir, tmp_path, "algorithm=rrhf", "iterations=1"), cwd=tmp_path)
    assert [r["iteration"] for r in read_history(tmp_path) if "iteration" in r] == [0, 1]
    checkpoint = tmp_path / "checkpoints" / "iter-000001"
    assert (checkpoint / "actor" / "adapter_model.safetensors").exists() and not (
        checkpoint / "critic"
    ).exists()


def test_coatis_critic_from_a_mean_pooled_reward_adapter_runs_end_to_end(tmp_path, artifacts_dir):
    extra = ["algorithm=ppo_sampled", "algorithm.baseline=critic_coati", "critic.init=reward_mean"]
    run_entry(lora_args(artifacts_dir, tmp_path, *extra, "iterations=1"), cwd=tmp_path)
    rows = [r for r in read_history(tmp_path) if "iteration" in r]
    assert {"train/value_loss", "train/advantage_std"} <= set(rows[1])
    artifacts = read_summary(tmp_path)["artifacts"]
    critic, reward = artifacts_dir / artifacts["critic"], artifacts_dir / artifacts["reward"]
    assert (critic / "adapter_config.json").exists() and value_metadata(critic)["pooling"] == "mean"
    assert value_metadata(reward)["pooling"] == "last"
    assert (tmp_path / "checkpoints" / "iter-000001" / "critic" / "adapter_model.safetensors").exists()


def test_a_killed_lora_run_resumes_exactly(tmp_path, artifacts_dir, ppo_gae_run):
    args = lora_args(artifacts_dir, tmp_path, "iterations=2", "checkpoint_every=1")
    # 4 optimiser steps an iteration (ppo_epochs x one minibatch): killed in iteration 2's update
    assert fault_run("update", 6, args, tmp_path).returncode == -9
    run_entry(args, cwd=tmp_path)
    assert comparable(read_history(tmp_path)) == comparable(read_history(ppo_gae_run))
    for role in ("actor", "critic"):
        ours, theirs = (
            load_file(run / "checkpoints" / "iter-000002" / role / "adapter_model.safetensors")
            for run in (tmp_path, ppo_gae_run)
        )
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
