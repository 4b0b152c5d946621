"""The RL loop, the same for every algorithm.

    evaluate (iteration 0: the SFT policy)
    for each iteration:
        collect   the algorithm's data source: a batch of responses with log-probs, reference
                  log-probs, values and rewards (sampled now, sampled up front, or given pairs)
        prepare   algorithm.prepare(rollouts): advantages / returns / ranks (no grad)
        update    E epochs x minibatches of algorithm.loss -> backward -> clip -> step
        control   KL controller update with the measured KL
        log       one history row (iteration, samples, tokens, wall time, rollout/*, train/*)
        evaluate  every N iterations and at the last, on held-out prompts (sampled and greedy)
        checkpoint

Every algorithm is measured with the same KL: per response, the sum over its tokens of
log pi - log pi_ref (k1), then the mean over responses (``rollout/kl_mean``), whatever
estimator the algorithm's own shaping uses.

The trainer is given what it runs, built (backbone/build.py): the data source, the engine, the
KL controller, PTX, EMA and the checkpoint manager; it reads no config.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import trapezoid

from algorithms.base import Algorithm
from backbone import distributed
from backbone.batch import Batch, Rollouts
from backbone.checkpoint import CheckpointManager
from backbone.ema import EMA
from backbone.kl import KLController
from backbone.progress import progress
from backbone.ptx import PTXMixer
from backbone.rng import rng_state, set_rng_state
from backbone.rollout import RolloutCollector
from backbone.sources import DataSource
from backbone.tasks.base import Task
from backbone.tracking import Tracker

log = logging.getLogger(__name__)


def planned_iterations(cfg) -> int:
    """``iterations``, or the sample budget ``total_samples`` in whole iterations."""
    if cfg.total_samples is None:
        return cfg.iterations
    return max(1, cfg.total_samples // cfg.rollout.samples_per_iteration)


def sequence_kl(rollouts: Rollouts) -> torch.Tensor:
    """The shared KL measure per response, [B]: sum_t (log pi - log pi_ref) over its tokens."""
    return ((rollouts.logprobs - rollouts.ref_logprobs) * rollouts.response_mask).sum(dim=1)


def rollout_metrics(rollouts: Rollouts, prefix: str) -> dict[str, float]:
    """The shared metrics of the policy's own samples (responses taken from data are left out); none
    for a batch without any (given preference pairs)."""
    if rollouts.sampled is not None:
        rollouts = rollouts.select(torch.nonzero(rollouts.sampled).flatten())
    if len(rollouts) == 0:
        return {}
    kl = sequence_kl(rollouts)
    shaping_kl = rollouts.kl.sum(dim=1)  # the configured estimator, summed per response
    row = {
        f"{prefix}/reward_mean": rollouts.scores.mean().item(),
        f"{prefix}/reward_std": rollouts.scores.std().item() if len(rollouts) > 1 else 0.0,
        f"{prefix}/kl_mean": kl.mean().item(),
        f"{prefix}/response_len_mean": rollouts.response_lengths.float().mean().item(),
    }
    if rollouts.kl_exact is not None:  # the same per-response sum, over the vocabulary at each token
        row[f"{prefix}/kl_exact_mean"] = rollouts.kl_exact.sum(dim=1).mean().item()
    if prefix == "rollout":
        row["rollout/reward_normalized_mean"] = rollouts.rewards.mean().item()
        row["rollout/kl_estimate_mean"] = shaping_kl.mean().item()
        row["rollout/kl_negative_frac"] = (shaping_kl < 0).float().mean().item()
    if rollouts.gold is not None:
        row[f"{prefix}/gold_mean"] = rollouts.gold.mean().item()
    if prefix.startswith("eval") and not prefix.endswith("greedy"):
        row[f"{prefix}/reward_se"] = sampling_se(rollouts.scores, rollouts.group)
        if rollouts.gold is not None:
            row[f"{prefix}/gold_se"] = sampling_se(rollouts.gold, rollouts.group)
    return row


def sampling_se(values: torch.Tensor, group: torch.Tensor) -> float:
    """The sampling noise of an evaluation mean over fixed prompts: its standard error
    sqrt(sum_p var_p / k_p) / P, from the within-prompt variance var_p (ddof=1) of each prompt's
    k_p samples; NaN with fewer than two samples per prompt. The prompts are the same for every
    arm, so only the sampling varies between two evaluations of one policy."""
    variances, counts = [], []
    for g in torch.unique(group):
        v = values[group == g].double()
        if len(v) < 2:
            return float("nan")
        variances.append(v.var())
        counts.append(len(v))
    variance = torch.stack(variances) / torch.tensor(counts, dtype=torch.float64)
    return float(variance.sum().sqrt() / len(counts))


def mean_gain_over_budget(points: list[tuple[float, float]]) -> float:
    """Area under a metric's gain curve over the sample budget, per sample: with (samples, value)
    evaluation points from samples 0 to S, (1/S) * integral_0^S (v(s) - v(0)) ds by the trapezoid
    rule. The tuning score: it rewards rising early and staying high, not one lucky last point."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return float("nan")
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float) - points[0][1]
    return float(trapezoid(y, x) / (x[-1] - x[0]))


def evaluation_due(
    iteration: int, last: int, samples_per_iteration: int, eval_every: int, eval_every_samples: int | None
) -> bool:
    """At the last iteration, and every ``eval_every_samples`` samples consumed (the same sample counts
    for every arm, whatever its batch size), or else every ``eval_every`` iterations."""
    if iteration == last:
        return True
    if eval_every_samples is None:
        return iteration % eval_every == 0
    return iteration * samples_per_iteration % eval_every_samples == 0


class Preempted(Exception):
    """SIGTERM arrived; the run stopped after its current iteration, with a checkpoint."""


class NonFiniteTraining(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class Schedule:
    """How long the loop runs and when it evaluates, logs and checkpoints."""

    iterations: int
    # budget units (the source's: samples or pairs) each iteration consumes
    units_per_iteration: int
    # rows per minibatch on this rank (the algorithm's minibatch over the ranks)
    minibatch_size: int
    eval_every: int
    eval_every_samples: int | None
    eval_samples: int
    checkpoint_every: int
    max_nonfinite_steps: int
    table_every: int
    seed: int


class Trainer:
    def __init__(
        self,
        schedule: Schedule,
        task: Task,
        algorithm: Algorithm,
        source: DataSource,
        collector: RolloutCollector,
        engine,
        kl_ctl: KLController,
        ptx: PTXMixer,
        ema: EMA | None,
        checkpoints: CheckpointManager,
        tracker: Tracker,
        config: dict,
    ):
        self.schedule = schedule
        self.iterations = schedule.iterations
        self.task = task
        self.algorithm = algorithm
        self.source = source
        self.collector = collector
        self.stack = collector.stack
        self.timer = collector.timer
        self.engine = engine
        self.kl_ctl = kl_ctl
        self.ptx = ptx
        self.ema = ema
        self.checkpoints = checkpoints
        self.tracker = tracker
        self.config = config  # the run's resolved config, kept in every checkpoint
        self.shuffle = torch.Generator().manual_seed(schedule.seed)
        self.iteration = 0
        # the compute an arm spent, beside its budget: optimiser steps taken and the tokens that went
        # through the actor's forward and backward (prompt + response, once per epoch)
        self.optimizer_steps = 0
        self.tokens_trained = 0
        self.eval_curve: list[tuple[int, dict[str, float]]] = []  # (budget consumed, eval row)
        self.nonfinite_steps = 0  # skipped optimiser steps, in all
        self.nonfinite_in_a_row = 0
        self.first_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.sigterm = False
        self.start_time = time.perf_counter()

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train from the current state (iteration 0, or a restored checkpoint) to the last iteration."""
        with self.sigterm_checkpoints():
            if self.iteration == 0:
                with self.timer.phase("eval"):
                    self.first_eval = self.last_eval = self.evaluate()
                self.eval_curve.append((0, self.first_eval))
                self.log_row({**self.first_eval, **self.timer.pop()})
                with self.timer.phase("rollout"):
                    self.source.start(self.iterations)
            bar = progress(
                range(self.iteration + 1, self.iterations + 1),
                desc=self.algorithm.name,
                initial=self.iteration,
                total=self.iterations,
                disable=not distributed.is_main(),
            )
            for iteration in bar:
                self.iteration = iteration
                row = self.train_iteration()
                postfix = {"reward": row.get("rollout/reward_mean"), "kl": row.get("rollout/kl_mean")}
                bar.set_postfix({k: f"{v:.2f}" for k, v in postfix.items() if v is not None}, refresh=False)
        return self.summary()

    def train_iteration(self) -> dict[str, float]:
        with self.timer.phase("rollout"):
            rollouts = self.source.next(self.iteration, self.kl_ctl.value)
        with self.timer.phase("prepare"), torch.no_grad():
            batch = self.algorithm.prepare(rollouts)
        with self.timer.phase("update"):
            row = {**rollout_metrics(rollouts, "rollout"), **self.update(batch)}
        # every rank steps its KL controller with the same, global, measure
        row = distributed.mean_over_ranks(row)
        row["kl/coef"] = self.kl_ctl.value
        # the shared measure over the policy's own samples drives the controller (a source that
        # generates nothing leaves it as it is)
        if "rollout/kl_mean" in row:
            self.kl_ctl.update(row["rollout/kl_mean"], n_steps=self.schedule.units_per_iteration)
        iteration = self.iteration
        if self.evaluation_due(iteration):
            with self.timer.phase("eval"):
                self.last_eval = self.evaluate()
            self.eval_curve.append((self.budget_consumed(iteration), self.last_eval))
            row.update(self.last_eval)
        # the row is written before the checkpoint that covers it, so a resume never lacks it;
        # logging and checkpointing are timed into the next row
        with self.timer.phase("log"):
            self.log_row({**row, **self.timer.pop()})
        max_nonfinite = self.schedule.max_nonfinite_steps
        diverged = self.nonfinite_in_a_row >= max_nonfinite
        due = iteration % self.schedule.checkpoint_every == 0 or iteration == self.iterations
        # a signal that reached any rank stops them all after the same iteration
        self.sigterm = not distributed.all_ranks(not self.sigterm)
        if due or diverged or self.sigterm:
            with self.timer.phase("checkpoint"):
                checkpoint = self.checkpoints.save(self.state(), self.stack, iteration, self.engine)
        if diverged:
            raise NonFiniteTraining(
                f"{self.nonfinite_in_a_row} optimiser steps in a row had a non-finite loss or gradient "
                f"(optim.max_nonfinite_steps={max_nonfinite}); none reached the "
                f"weights, which are saved in {checkpoint}. Lower the learning rate (algorithm.lr or "
                f"optim.lr_scale), or look at train/* and rollout/* in the last rows of the history."
            )
        if self.sigterm:
            raise Preempted(f"SIGTERM: stopped after iteration {iteration}, checkpoint {checkpoint}")
        return row

    def budget_consumed(self, iteration: int) -> int:
        """Budget units (the source's: samples or pairs) the updates up to ``iteration`` have trained on:
        the axis runs are compared on and evaluations spaced on (a frozen buffer is generated up front,
        and given pairs not at all, so ``samples`` would not do)."""
        return iteration * self.schedule.units_per_iteration

    def evaluation_due(self, iteration: int) -> bool:
        s = self.schedule
        return evaluation_due(
            iteration, self.iterations, s.units_per_iteration, s.eval_every, s.eval_every_samples
        )

    @contextmanager
    def sigterm_checkpoints(self) -> Iterator[None]:
        """SIGTERM (a cluster pre-empting the job) finishes the current iteration, checkpoints it and
        raises ``Preempted``. Only the main thread can install a handler; elsewhere SIGTERM kills."""

        def handler(signum, frame):
            log.warning("SIGTERM: checkpointing after the current iteration, then stopping")
            self.sigterm = True

        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def update(self, batch: Batch) -> dict[str, float]:
        """E epochs over the batch in minibatches that keep each prompt's samples together; steps
        with a non-finite loss or gradient are skipped and counted (``train/nonfinite_steps``).
        The row holds the minibatch statistics averaged over steps, and the batch's own (``Batch.stats``)."""
        sums: dict[str, float | torch.Tensor] = defaultdict(float)  # tensors stay on the device until the end
        steps = skipped = 0
        trained = 0  # this rank's tokens through forward and backward; a device tensor until the end
        for minibatch in self.minibatches(batch):
            loss, stats = self.algorithm.loss(self.stack, minibatch)
            total = loss
            ptx_loss = None
            if self.ptx.coef > 0:
                ptx_loss = self.ptx.loss(self.stack.actor)
                total = loss + self.ptx.coef * ptx_loss
            grad_norm = self.optimizer_step(total)
            if grad_norm is None:
                skipped += 1
                if self.nonfinite_in_a_row >= self.schedule.max_nonfinite_steps:
                    break
                continue
            steps += 1
            self.optimizer_steps += 1
            trained = trained + minibatch.rollouts.attention_mask.sum()
            sums["train/grad_norm"] += grad_norm
            sums["train/loss"] += loss.detach()
            if ptx_loss is not None:
                sums["train/ptx_loss"] += ptx_loss.detach()
            for key, value in stats.items():
                sums[f"train/{key}"] += value
        # one read and one all-reduce per update, not per step (ranks take the same steps)
        self.tokens_trained += int(distributed.sum_over_ranks(int(trained)))
        row = {key: float(value) / steps for key, value in sums.items()}
        row.update({f"train/{key}": float(value) for key, value in batch.stats.items()})
        row["train/nonfinite_steps"] = skipped
        row.update({f"train/lr/{name}": lr for name, lr in self.engine.learning_rates().items()})
        return row

    def minibatches(self, batch: Batch) -> Iterator[Batch]:
        for _ in range(self.algorithm.ppo_epochs):
            yield from batch.minibatches(self.schedule.minibatch_size, self.shuffle)

    def optimizer_step(self, total: torch.Tensor) -> float | None:
        """Backward and step; the gradient norm, or None when the step was skipped: a non-finite
        loss never reaches backward, a non-finite gradient never reaches the weights."""
        grad_norm = None
        # a rank that skipped backward would leave the others waiting in the gradient all-reduce
        if distributed.all_ranks(bool(torch.isfinite(total))):
            self.engine.backward(total)
            grad_norm = self.engine.step()
        if grad_norm is None:
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            return None
        self.nonfinite_in_a_row = 0
        if self.ema is not None:
            self.ema.update()
        return grad_norm

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Held-out prompts: sampled responses (reward, gold, KL, length) and greedy ones; under
        several ranks each evaluates its share and the means are over all of them."""
        prompts = distributed.shard(self.task.eval_prompts())
        with self.evaluation_noise():
            sampled = self.collector.collect(prompts, self.schedule.eval_samples, update_stats=False)
        greedy = self.collector.collect(prompts, 1, greedy=True, update_stats=False)
        row = {**rollout_metrics(sampled, "eval"), **rollout_metrics(greedy, "eval/greedy")}
        row.update(self.ptx.eval_losses(self.stack.actor, "eval"))
        if self.ema is not None:
            with self.ema.applied(), self.evaluation_noise():  # the live actor's noise: a paired comparison
                ema_sampled = self.collector.collect(prompts, self.schedule.eval_samples, update_stats=False)
                row.update(rollout_metrics(ema_sampled, "eval_ema"))
                row.update(self.ptx.eval_losses(self.stack.actor, "eval_ema"))
        table_every = self.schedule.table_every
        if table_every and self.iteration % table_every == 0:
            columns = ["prompt", "response", "reward", "gold"]
            gold = sampled.gold.tolist() if sampled.gold is not None else [None] * len(sampled)
            rows = [list(r) for r in zip(sampled.prompts, sampled.responses, sampled.scores.tolist(), gold)]
            self.tracker.log_table("eval/samples", columns, rows, self.step_keys())
        return distributed.mean_over_ranks(row)

    @contextmanager
    def evaluation_noise(self) -> Iterator[None]:
        """Common random numbers: evaluation samples from a generator seeded by (seed, samples consumed,
        rank), the same for every arm of a seed at the same sample count, and restores the run's own
        RNG afterwards, so the training stream never depends on how often it is evaluated."""
        device = self.collector.device
        seed = np.random.SeedSequence(
            [self.schedule.seed, self.budget_consumed(self.iteration), distributed.rank()]
        ).generate_state(1)[0]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(seed))
            yield

    # ------------------------------------------------------------------ records

    def step_keys(self) -> dict[str, float]:
        return {
            "iteration": self.iteration,
            "budget": self.budget_consumed(self.iteration),
            "samples": self.source.samples,  # responses generated (not given, not evaluation's)
            "tokens": self.source.tokens,
            "optimizer_steps": self.optimizer_steps,
            "tokens_trained": self.tokens_trained,
            "time/elapsed_s": time.perf_counter() - self.start_time,
        }

    def log_row(self, row: dict[str, float]) -> dict[str, float]:
        self.tracker.log({**self.step_keys(), **row})
        return row

    def state(self) -> dict:
        """Everything but the weights that the run needs to continue exactly where it is."""
        return {
            "iteration": self.iteration,
            "samples": self.source.samples,  # responses generated (not given, not evaluation's)
            "tokens": self.source.tokens,
            "elapsed_s": time.perf_counter() - self.start_time,
            "optimizer_steps": self.optimizer_steps,
            "tokens_trained": self.tokens_trained,
            "eval_curve": [[samples, row] for samples, row in self.eval_curve],
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_shaper": self.collector.shaper.state_dict(),
            "source": self.source.state_dict(),
            "ptx": self.ptx.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "shuffle_rng": self.shuffle.get_state(),
            "rng": rng_state(),
            "first_eval": self.first_eval,
            "last_eval": self.last_eval,
            "wandb_run_id": self.tracker.run_id,
            "config": self.config,
        }

    def load_state(self, state: dict, checkpoint: Path) -> None:
        """Continue from a checkpoint: the engine's weights and optimiser, and ``state()``; the next
        iteration is the one after."""
        self.engine.load_checkpoint(checkpoint, self.stack)
        self.iteration = state["iteration"]
        self.start_time = time.perf_counter() - state["elapsed_s"]
        self.optimizer_steps, self.tokens_trained = state["optimizer_steps"], state["tokens_trained"]
        self.eval_curve = [(samples, row) for samples, row in state["eval_curve"]]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.collector.shaper.load_state_dict(state["reward_shaper"])
        self.source.load_state_dict(state["source"])
        self.ptx.load_state_dict(state["ptx"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.shuffle.set_state(state["shuffle_rng"])
        set_rng_state(state["rng"])
        self.first_eval, self.last_eval = state["first_eval"], state["last_eval"]

    def summary(self) -> dict:
        first_eval, last_eval = self.first_eval, self.last_eval
        summary = {
            "algorithm": self.algorithm.name,
            "iterations": self.iteration,
            "budget": self.budget_consumed(self.iteration),
            "budget_unit": self.source.unit,
            "samples": self.source.samples,  # responses generated (not given, not evaluation's)
            "tokens": self.source.tokens,
            "optimizer_steps": self.optimizer_steps,
            "tokens_trained": self.tokens_trained,
            "nonfinite_steps": self.nonfinite_steps,
            "wall_time_s": time.perf_counter() - self.start_time,
        }
        for key in (
            "eval/reward_mean",
            "eval/kl_mean",
            "eval/gold_mean",
            "eval/response_len_mean",
            "eval/sft_loss",
            "eval/pretrain_loss",
            "eval_ema/reward_mean",
            "eval_ema/kl_mean",
            "eval_ema/gold_mean",
        ):
            if key in last_eval:
                summary[f"final/{key}"] = last_eval[key]
                summary[f"initial/{key}"] = first_eval[key]
                summary[f"gain/{key}"] = last_eval[key] - first_eval[key]
        for key in ("eval/reward_mean", "eval/gold_mean"):
            if key in last_eval:
                points = [(samples, row[key]) for samples, row in self.eval_curve]
                summary[f"auc_gain/{key}"] = mean_gain_over_budget(points)
        return summary
