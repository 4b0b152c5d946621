"""Settings that are each valid but cannot run together, caught at start-up.

Types, unknown keys and values outside a key's set of names are the schemas' job
(backbone/config.py, at composition). What a schema cannot see, a number out of range or two
keys that contradict each other, is found here, before any model loads, in one message that
names every offending key. And only the sandbox's own classes may be named by a ``_target_``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from algorithms.base import Algorithm
from backbone import distributed
from backbone.config import CriticConfig
from backbone.engine import deepspeed_config, micro_batch_size
from backbone.sources import groups_per_iteration

TARGET_PACKAGES = ("backbone.", "algorithms.")
AT_LEAST_ONE = (
    "rollout.samples_per_iteration",
    "rollout.max_new_tokens",
    "rollout.eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "optim.max_nonfinite_steps",
)


def check_targets(cfg: DictConfig) -> None:
    """Only the sandbox's own classes are built from a config: a ``_target_`` names code to import
    and call, and a config file (or a sweep's override) must not be a way to run anything else."""
    for group in ("task", "algorithm"):
        target = OmegaConf.select(cfg, f"{group}._target_")
        if not isinstance(target, str) or not target.startswith(TARGET_PACKAGES):
            raise ValueError(
                f"{group}._target_={target!r}: only classes of the packages {list(TARGET_PACKAGES)} are built"
            )


def check_run_config(cfg: DictConfig, algorithm: Algorithm) -> None:
    value = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    problems = [f"{key}={value(key)}: must be at least 1" for key in AT_LEAST_ONE if value(key) < 1]
    rollout = cfg.rollout
    if rollout.min_new_tokens > rollout.max_new_tokens:
        problems.append(
            f"rollout.min_new_tokens={rollout.min_new_tokens} > "
            f"rollout.max_new_tokens={rollout.max_new_tokens}"
        )
    every = rollout.eval_every_samples
    if every is not None and (every < 1 or every % rollout.samples_per_iteration):
        problems.append(
            f"rollout.eval_every_samples={every}: must be a positive multiple of "
            f"rollout.samples_per_iteration={rollout.samples_per_iteration}"
        )
    spec = algorithm.source
    groups = 0
    try:
        groups = groups_per_iteration(spec, rollout.samples_per_iteration)
    except ValueError as error:
        problems.append(str(error))
    # the batch an update sees: every row of the iteration's groups (samples, given responses, pairs)
    batch = groups * spec.group_size
    if groups and algorithm.minibatch_size > batch:
        problems.append(
            f"algorithm.minibatch_size={algorithm.minibatch_size} is larger than the batch of {batch} "
            f"responses per iteration (rollout.samples_per_iteration={rollout.samples_per_iteration})"
        )
    if not algorithm.needs_critic:
        if cfg.optim.critic_lr is not None:
            problems.append(f"optim.critic_lr={cfg.optim.critic_lr}: {algorithm.name} trains no critic")
        if cfg.critic.init != CriticConfig.init:
            problems.append(f"critic.init={cfg.critic.init!r}: {algorithm.name} trains no critic")
    problems += algorithm.check(cfg)
    problems += _peft_problems(cfg)
    if groups:
        problems += _engine_problems(cfg, groups, algorithm.minibatch_size)
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


def _peft_problems(cfg: DictConfig) -> list[str]:
    """What the one-base LoRA stack needs: its adapters sit on the SFT model (backbone/lora.py)."""
    if cfg.peft.mode != "lora_multi_adapter":
        return []
    problems = []
    if not OmegaConf.select(cfg, "peft.target_modules"):
        problems.append(
            "peft.target_modules is empty: LoRA needs the modules it adapts (model.lora_target_modules, "
            "read by peft=lora_multi_adapter)"
        )
    if cfg.reward_model.init != "sft":
        problems.append(
            f"reward_model.init={cfg.reward_model.init!r}: under peft=lora_multi_adapter the reward "
            "adapter sits on the SFT model, as every role does"
        )
    return problems


def _engine_problems(cfg: DictConfig, prompts_per_iteration: int, minibatch_size: int) -> list[str]:
    """What the distributed engine cannot do, given the ranks it runs on; a user's DeepSpeed JSON
    that cannot be read or changes what the trainer relies on."""
    engine, world = cfg.engine, distributed.world_size()
    problems = []
    if prompts_per_iteration % world:
        problems.append(
            f"{prompts_per_iteration} prompts (or pairs) per iteration cannot be shared equally by {world} "
            f"ranks (rollout.samples_per_iteration / algorithm.samples_per_prompt)"
        )
    if engine.name != "deepspeed":
        if world > 1:
            problems.append(f"engine.name={engine.name!r} runs one process; {world} ranks need deepspeed")
        if engine.deepspeed_config is not None:
            problems.append(
                f"engine.deepspeed_config={engine.deepspeed_config}: read by engine=deepspeed_zero* only"
            )
        return problems
    try:
        deepspeed_config(engine, cfg.optim, micro_batch_size(minibatch_size))
    except ValueError as error:
        problems.append(str(error))
    if engine.zero_stage not in (1, 2, 3):
        # stage 0 steps a non-finite gradient into the weights; engine=torch is the one-process path
        problems.append(f"engine.zero_stage={engine.zero_stage}: DeepSpeed runs at ZeRO stage 1, 2 or 3")
    if engine.offload_param and engine.zero_stage != 3:
        problems.append("engine.offload_param: parameters are offloaded at ZeRO stage 3 only")
    if engine.zero_stage == 3 and cfg.ema.enabled:
        problems.append("ema.enabled with ZeRO-3: the EMA keeps whole weights, which ZeRO-3 partitions")
    return problems
