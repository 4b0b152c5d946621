"""The contract every registered algorithm meets, checked for each without naming any: a new module in
algorithms/ gets these tests for free.

Built from its config (``algorithm=<name>``), it passes the run checks at the default budget, takes one
batch from the data source it declares, turns it into a finite loss whose step changes the trainable
weights, and a short run through the Trainer logs the rows every dashboard reads. That it learns is
tests/test_learning.py's job, which must cover every registered algorithm too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, read_history
from hydra.utils import instantiate
from test_run import SMALL as RUN_SMALL

from algorithms import REGISTRY
from algorithms.base import Algorithm, AlgorithmConfig
from backbone.batch import Batch, Rollouts
from backbone.build import build_collector, build_trainer
from backbone.rng import apply_seed_scope, seed_everything
from backbone.sources import build_source, minibatches_per_epoch
from backbone.stages import prepare_stages, stage_rows_to
from backbone.tracking import Tracker
from backbone.validation import check_run_config

# what every RL history row carries, and what every evaluation row adds, whatever the algorithm
COMMON_KEYS = {"iteration", "budget", "samples", "tokens", "optimizer_steps", "tokens_trained", "kl/coef"}
COMMON_TRAIN_KEYS = {"train/loss", "train/grad_norm", "train/nonfinite_steps", "train/lr/actor"}
COMMON_EVAL_KEYS = {"eval/reward_mean", "eval/kl_mean", "eval/gold_mean", "eval/greedy/gold_mean"}
# the SFT and reward model of test_run's SMALL stage (built once for most files), never the default
# size's, which test_learning builds and which would keep this file waiting
STAGE_KEYS = ("task.n_sft_train", "task.n_pref_train", "sft.", "reward_model.")
SMALL = [
    *(o for o in RUN_SMALL if o.startswith(STAGE_KEYS)),
    "rollout.samples_per_iteration=16",
    "rollout.eval_samples=2",
    "task.n_eval_prompts=8",
]


def disabled_tracker(run_dir, name: str) -> Tracker:
    """The run record in ``run_dir`` (history.jsonl, summary.json), no W&B."""
    return Tracker(
        run_dir,
        mode="disabled",
        project="p",
        entity=None,
        group="g",
        job_type=name,
        name=name,
        tags=[],
        config={},
    )


@pytest.fixture(scope="module")
def parts(artifacts_dir):
    """The SMALL stage's SFT and reward-model artifacts (the session cache), per algorithm name."""

    def build(name: str):
        cfg = apply_seed_scope(
            compose_config([f"algorithm={name}", f"paths.artifacts={artifacts_dir}", *SMALL])
        )
        task = instantiate(cfg.task)
        algorithm = instantiate(cfg.algorithm)
        stages = prepare_stages(cfg, task, stage_rows_to(lambda row: None))
        seed_everything(cfg.seed)
        return cfg, task, algorithm, build_collector(cfg, task, algorithm, stages, torch.device("cpu"))

    return build


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_algorithm_option_is_its_registered_schema(name):
    cfg = compose_config([f"algorithm={name}"])
    algorithm = instantiate(cfg.algorithm)
    assert isinstance(algorithm, REGISTRY[name]) and algorithm.name == name
    assert issubclass(algorithm.Config, AlgorithmConfig)
    check_run_config(cfg, algorithm)  # its defaults run on the default budget


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_one_batch_from_its_source_gives_a_finite_loss_whose_step_moves_the_weights(name, parts):
    cfg, task, algorithm, collector = parts(name)
    source = build_source(
        algorithm.source, collector, task, cfg.rollout.samples_per_iteration, cfg.seed, algorithm.needs_critic
    )
    source.start(1)
    rollouts = source.next(1, kl_coef=0.05)
    assert len(rollouts) == source.groups * source.spec.group_size
    with torch.no_grad():
        batch = algorithm.prepare(rollouts)
    stack = collector.stack
    trainable = {n: p.detach().clone() for n, p in stack.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in stack.parameters() if p.requires_grad], lr=1e-2)
    minibatch = next(batch.minibatches(algorithm.minibatch_size, torch.Generator().manual_seed(0)))
    loss, stats = algorithm.loss(stack, minibatch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(value.dim() == 0 and not value.requires_grad for value in stats.values())
    loss.backward()
    optimizer.step()
    moved = [n for n, p in stack.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any(n.startswith("actor.") for n in moved), "the actor's weights did not change"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_short_run_logs_the_common_rows(name, parts, tmp_path):
    cfg, task, algorithm, collector = parts(name)
    # a linear schedule ends at 0 exactly when it was planned for the steps the source's batches pack into
    cfg.iterations, cfg.rollout.eval_every, cfg.optim.scheduler = 2, 2, "linear"
    tracker = disabled_tracker(tmp_path, name)
    with tracker:
        summary = build_trainer(cfg, task, algorithm, collector, tracker, tmp_path).run()
    rows = read_history(tmp_path)
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert all(row.keys() >= COMMON_EVAL_KEYS for row in (rows[0], rows[-1]))
    assert all(row.keys() >= COMMON_KEYS | COMMON_TRAIN_KEYS for row in rows[1:])
    assert [row["budget"] for row in rows] == [0, 16, 32]
    assert summary["budget"] == 32 and summary["budget_unit"] == algorithm.source.unit
    assert summary["optimizer_steps"] == rows[-1]["optimizer_steps"] > 0
    assert rows[-1]["train/lr/actor"] == 0.0 < rows[1]["train/lr/actor"]


@pytest.mark.parametrize(
    ("group_size", "groups", "minibatch_size"), [(5, 16, 16), (4, 16, 16), (2, 7, 3), (9, 3, 64)]
)
def test_the_planned_steps_are_the_minibatches_the_groups_pack_into(group_size, groups, minibatch_size):
    group = torch.arange(groups).repeat_interleave(group_size)  # [B]
    rows = len(group)
    rollouts = Rollouts(
        *(torch.zeros(rows, 1, dtype=torch.long) for _ in range(4)),
        group=group,
        **{key: torch.zeros(rows, 1) for key in ("logprobs", "ref_logprobs", "kl")},
        scores=torch.zeros(rows),
        rewards=torch.zeros(rows),
    )
    packed = list(Batch(rollouts, {}).minibatches(minibatch_size, torch.Generator().manual_seed(0)))
    assert len(packed) == minibatches_per_epoch(groups, group_size, minibatch_size)
    assert sum(len(b) for b in packed) == rows


class Stub(Algorithm):
    """Not registered: the trainer runs any Algorithm it is given. Raise the samples' log-likelihood."""

    Config = AlgorithmConfig

    def prepare(self, rollouts: Rollouts) -> Batch:
        return Batch(rollouts, {})

    def loss(self, policy, batch):
        mask = batch.rollouts.response_mask.float()  # [B, T]
        nll = -(policy.forward(batch.rollouts).logprobs * mask).sum() / mask.sum()
        return nll, {"nll": nll.detach()}


def test_the_trainer_runs_an_algorithm_nobody_registered(parts, tmp_path):
    cfg, task, _, collector = parts("ppo_sampled")  # its stack has no critic
    cfg.iterations = 1
    stub = Stub(name="stub", lr=1e-3, ppo_epochs=2, minibatch_size=8)
    tracker = disabled_tracker(tmp_path, "stub")
    with tracker:
        build_trainer(cfg, task, stub, collector, tracker, tmp_path).run()
    last = read_history(tmp_path)[-1]
    assert last["optimizer_steps"] == 2 * 2 and "train/nll" in last  # 2 epochs x 16 samples / 8
