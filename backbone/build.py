"""A run's RL parts, built from its config: the collector over the four roles, and the trainer with
everything it runs (data source, engine, KL controller, PTX, EMA, checkpoints). This is the one
place that reads the config groups for them; the Trainer itself reads no config."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from algorithms.base import Algorithm
from backbone import distributed
from backbone.checkpoint import CheckpointManager
from backbone.ema import EMA
from backbone.engine import build_engine, micro_batch_size
from backbone.kl import build_kl_controller
from backbone.models import load_tokenizer
from backbone.ptx import PTXMixer
from backbone.reward import RewardShaper
from backbone.roles import build_policy_stack
from backbone.rollout import RolloutCollector
from backbone.sources import build_source
from backbone.stages import StageArtifacts
from backbone.tasks.base import Task
from backbone.tracking import Tracker
from backbone.trainer import Schedule, Trainer, planned_iterations

log = logging.getLogger(__name__)


def build_collector(
    cfg: DictConfig,
    task: Task,
    algorithm: Algorithm,
    stages: StageArtifacts,
    device: torch.device,
    collector_class: type[RolloutCollector] = RolloutCollector,
) -> RolloutCollector:
    """The four roles from the stage artifacts, the reward shaping, and the collector over them."""
    tokenizer = load_tokenizer(stages.sft, trust_remote_code=cfg.model.trust_remote_code)
    critic = stages.critic if algorithm.needs_critic else None
    stack = build_policy_stack(stages.sft, stages.reward, critic, cfg.model, algorithm.values_per).to(device)
    meta = stack.reward.metadata
    shaper = RewardShaper(
        normalize=cfg.reward.normalize,
        clip=cfg.reward.clip,
        missing_eos_penalty=cfg.reward.missing_eos_penalty,
        rm_mean=meta.get("chosen_mean", 0.0),
        rm_std=meta.get("chosen_std", 1.0),
    )
    collector = collector_class(
        stack, tokenizer, task, shaper, cfg.kl.estimator, cfg.rollout, cfg.model.max_length, device
    )
    zero3 = cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3
    collector.synced_gpus = zero3 and distributed.world_size() > 1
    return collector


def build_trainer(
    cfg: DictConfig,
    task: Task,
    algorithm: Algorithm,
    collector: RolloutCollector,
    tracker: Tracker,
    run_dir: str | Path,
) -> Trainer:
    rollout = cfg.rollout
    source = build_source(
        algorithm.source, collector, task, rollout.samples_per_iteration, cfg.seed, algorithm.needs_critic
    )
    schedule = Schedule(
        iterations=planned_iterations(cfg),
        units_per_iteration=rollout.samples_per_iteration,
        minibatch_size=micro_batch_size(algorithm.minibatch_size),
        eval_every=rollout.eval_every,
        eval_every_samples=rollout.eval_every_samples,
        eval_samples=rollout.eval_samples,
        checkpoint_every=cfg.checkpoint_every,
        max_nonfinite_steps=cfg.optim.max_nonfinite_steps,
        table_every=cfg.logger.table_every,
        seed=cfg.seed,
    )
    stack = collector.stack
    # the schedule's length: the optimiser steps the source's batches will actually be packed into
    steps = schedule.iterations * algorithm.ppo_epochs * source.updates_per_epoch(schedule.minibatch_size)
    critic_lr = cfg.optim.critic_lr * cfg.optim.lr_scale if cfg.optim.critic_lr else None
    engine = build_engine(
        stack,
        stack.parameter_groups(algorithm.lr * cfg.optim.lr_scale, critic_lr),
        cfg,
        total_steps=steps,
        minibatch_size=algorithm.minibatch_size,
    )
    beta = collector.shaper.kl_coef(cfg.kl.coef, cfg.kl.coef_units)
    ptx = PTXMixer(
        task,
        collector.tokenizer,
        cfg.model.max_length,
        cfg.ptx.coef,
        cfg.ptx.source,
        cfg.ptx.batch_size,
        collector.device,
        cfg.seed,
    )
    return Trainer(
        schedule,
        task,
        algorithm,
        source,
        collector,
        engine,
        build_kl_controller(beta, cfg.kl.target, cfg.kl.horizon),
        ptx,
        EMA(stack.role_parameters("actor"), cfg.ema.decay) if cfg.ema.enabled else None,
        CheckpointManager(
            Path(run_dir) / "checkpoints", keep=cfg.keep_checkpoints, tokenizer=collector.tokenizer
        ),
        tracker,
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    )


def count_truncated_prompts(task: Task, collector: RolloutCollector) -> int:
    """RL and eval prompts longer than generation leaves room for, warned about: they lose their start."""
    truncated = collector.count_truncated([*task.rl_prompts(), *task.eval_prompts()])
    if truncated:
        log.warning(
            "%d RL and eval prompts are longer than model.max_length - rollout.max_new_tokens = %d "
            "tokens; they are cut from the left (their start is lost)",
            truncated,
            collector.max_prompt_len,
        )
    return truncated
