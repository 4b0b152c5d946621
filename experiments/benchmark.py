"""Where the time of training goes, measured against a lower bound of the same work done bare.

    python -m experiments.benchmark iteration [OVERRIDES...] [--algorithms ppo_gae,ppo_sampled,rrhf]
        [--iterations 5] [--warmup 1] [--out outputs/benchmarks]
    python -m experiments.benchmark sft [OVERRIDES...] [--steps 20] [--warmup 1]
    python -m experiments.benchmark memory [OVERRIDES...] [--out outputs/benchmarks]
    python -m experiments.benchmark sweep [SWEEP OVERRIDES...] [--keep DIR] [--out outputs/benchmarks]

OVERRIDES are Hydra overrides of the project's conf/ (``model=gpt2_124m_shape``,
``rollout.samples_per_iteration=8``, ...), as for ``experiments.run``.

``iteration`` builds the pipeline as ``experiments.run`` does and runs the Trainer for
warm-up + measured iterations, evaluation and checkpoints pushed out of the way; it reads the
per-phase times the trainer logs (``time/<phase>_s``, backbone/timing.py). Then, with the same
models and each measured iteration's own batch, it times the work no implementation can skip:
a bare ``generate`` of as many new tokens (EOS suppressed), one no-grad forward per frozen
role (reference, reward model, critic when the algorithm has one) over the same sequences,
and forward + backward + optimiser step over the same minibatches for every epoch. The ratio
iteration / lower bound says how much room is left. The actor's own log-prob pass is not
in the bound: generation returns those log-probs (``rollout.logprobs=generate``, the default;
``rollout.logprobs=forward`` adds the separate pass back, to measure what it costs).

``sft`` times SFT steps on padded examples and on packed blocks (``sft.packing``) and reports
real (non-pad) tokens per second.

``memory`` holds the four roles of the config's model (untrained; ``model=gpt2_124m_shape``
for GPT-2 small's shape) in each storage mode, ``peft=none`` (separate full models) and
``peft=lora_multi_adapter`` (one base with adapters), and runs one RL step on an update
minibatch of random tokens: every role's rollout pass, then the actor's and critic's forward,
backward and AdamW step; each without and with gradient checkpointing. Each is measured in a
fresh process, beside one model alone run forward over the same minibatch and then trained for
one LoRA step (what fine-tuning one model costs: the reference of an update's peak): the weights
held (parameters and buffers, a storage shared by roles counted once) and the peak memory over
the process's size before building. Besides the report it writes ``memory_<mode>[-checkpointing]-*.json``
per measurement, the results analysis/claims reads.

``sweep`` runs a real multirun, ``python -m experiments.run -m SWEEP OVERRIDES`` on the local parallel
launcher (``+experiment=three_algorithms`` times a catalogue row; ``algorithm=ppo_gae,rrhf seed=0,1`` a
small sweep), into a fresh folder with a fresh artifact cache unless ``paths.artifacts`` is given, and
reports its wall-clock, jobs per hour, and where the jobs' time went, from each job's summary
(``time/job_s`` and its phases, experiments.run): building or loading the stages, best-of-n, RL
(of which evaluation: the history's ``time/eval_s``), the rest of the job (config, task, W&B, models),
and what lies outside every job: process start, imports and the launcher, the sweep's wall-clock times
its workers less the jobs' own time.

Each run writes one JSON file under ``--out`` and prints its tables. Peak memory is the
process's resident set on CPU (its high-water mark reset per measurement where Linux allows)
and ``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from algorithms.base import Algorithm
from analysis.records import job_folders
from backbone.batch import Batch, Rollouts
from backbone.build import build_collector, build_trainer
from backbone.config import register_configs
from backbone.engine import configure_cpu, cpu_threads, resolve_device
from backbone.lora import add_lora
from backbone.models import (
    PolicyStack,
    ValueModel,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    position_ids,
    response_logprobs,
    response_values,
    with_gradient_checkpointing,
)
from backbone.provenance import environment
from backbone.rng import apply_seed_scope, seed_everything
from backbone.roles import build_policy_stack
from backbone.rollout import RolloutCollector
from backbone.sources import Frozen, Online
from backbone.stages import build_base, encode_rows, prepare_stages, sft_loss, sft_train_rows, stage_rows_to
from backbone.timing import PhaseTimer
from backbone.tracking import Tracker

CONF = Path(__file__).resolve().parents[1] / "conf"
NEVER = 10**9  # an evaluation or checkpoint interval that no benchmark reaches

register_configs()


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return apply_seed_scope(compose("config", overrides=overrides))


def setup_device(cfg: DictConfig, keep_freed: bool = True) -> torch.device:
    transformers.utils.logging.disable_progress_bar()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.engine.device)
    configure_cpu(device, cpu_threads(cfg.engine.cpu_threads), keep_freed)
    return device


# --------------------------------------------------------------------------- measurements


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes of repeated measurements."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values), "n": len(values)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the resident-set high-water mark; elsewhere the peak stays
    # the process's peak so far
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> dict[str, float | str]:
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda_max_allocated"}
    # Linux: VmHWM (KiB), this process's own high-water mark; getrusage's ru_maxrss also keeps the
    # peak of the process it was forked from (a spawned measurement's parent)
    with contextlib.suppress(OSError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        kib = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
        return {"peak_mb": kib / 1024, "kind": "rss_high_water"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mb": kib / 1024, "kind": "rss_high_water"}


def machine(device: torch.device) -> dict:
    """What the numbers were measured on, and how busy it was (1-minute load average; the benchmark's
    own process counts about 1 of it)."""
    return {
        **environment(device),  # date, commit, CPU, GPU, versions: what a run's summary records
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # set before torch loads (experiments/__init__.py): passive where processes share the cores
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_1min_at_end": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- iteration


class RecordingCollector(RolloutCollector):
    """The trainer's collector, keeping every training batch it hands out (evaluation's are not kept)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[Rollouts] = []

    def collect(self, *args, update_stats: bool = True, **kwargs) -> Rollouts:
        rollouts = super().collect(*args, update_stats=update_stats, **kwargs)
        if update_stats:
            self.batches.append(rollouts)
        return rollouts


def train_and_record(
    cfg: DictConfig, device: torch.device
) -> tuple[list[dict], RecordingCollector, Algorithm]:
    """The objects of ``experiments.run``'s ``train``, run with a disabled logger in a temporary folder;
    returns the history rows, the collector (with its batches) and the algorithm."""
    task = instantiate(cfg.task)
    algorithm = instantiate(cfg.algorithm)
    if not isinstance(algorithm.source, Online) or isinstance(algorithm.source, Frozen):
        raise ValueError(
            f"{algorithm.name}: its batches are not sampled in its iterations (sampled up front, or given "
            "pairs), so they have no rollout to time; benchmark algorithm.mode=online"
        )
    stages = prepare_stages(cfg, task, stage_rows_to(lambda row: None))
    reset_peak_memory(device)
    collector = build_collector(cfg, task, algorithm, stages, device, RecordingCollector)
    seed_everything(cfg.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = Tracker(
            run_dir,
            mode="disabled",
            project=cfg.logger.project,
            entity=None,
            group="benchmark",
            job_type=algorithm.name,
            name=algorithm.name,
            tags=[],
            config={},
        )
        with tracker:
            build_trainer(cfg, task, algorithm, collector, tracker, run_dir).run()
        rows = [json.loads(line) for line in (Path(run_dir) / "history.jsonl").read_text().splitlines()]
    return rows, collector, algorithm


def bare_minibatches(rollouts: Rollouts, algorithm: Algorithm, seed: int) -> list[tuple]:
    """The update's minibatches (epochs x groups packed as the trainer packs them), as the tensors a bare
    step needs: input_ids and attention_mask [b, P + T], response targets [b, T] (-100 on pads), P."""
    shuffle = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(algorithm.ppo_epochs):
        for minibatch in Batch(rollouts, {}).minibatches(algorithm.minibatch_size, shuffle):
            mb = minibatch.rollouts
            targets = mb.response_ids.masked_fill(mb.response_mask == 0, -100)
            out.append((mb.input_ids, mb.attention_mask, targets, mb.prompt_ids.shape[1]))
    return out


def lower_bound(
    collector: RolloutCollector,
    stack: PolicyStack,
    rollouts: Rollouts,
    minibatches: list[tuple],
    optimizer: torch.optim.Optimizer,
    needs_critic: bool,
) -> dict[str, float]:
    """Seconds of the bare work of one iteration on ``rollouts``' shapes, per part."""
    timer = PhaseTimer(collector.device)
    sampled = rollouts.sampled if rollouts.sampled is not None else slice(None)
    generation = collector.generation_config(greedy=False)
    # exactly as many decoding steps as the iteration took: its longest sampled response
    generation.min_new_tokens = generation.max_new_tokens = int(rollouts.response_lengths[sampled].max())
    ids, mask = rollouts.input_ids, rollouts.attention_mask  # [B, P + T]
    with torch.no_grad():
        with timer.phase("generate"):
            stack.actor.generate(
                input_ids=rollouts.prompt_ids[sampled],
                attention_mask=rollouts.prompt_mask[sampled],
                generation_config=generation,
            )
        with timer.phase("reference_forward"):
            stack.reference(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        if needs_critic:
            with timer.phase("critic_forward"):
                stack.critic(ids, mask)
        with timer.phase("reward_forward"):
            stack.reward(ids, mask)
    with timer.phase("update"):
        for input_ids, attention_mask, targets, prompt_len in minibatches:
            response_len = targets.shape[1]
            logits = stack.actor(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                logits_to_keep=response_len + 1,  # no LM head over the prompt
            ).logits[:, -(response_len + 1) : -1]  # [b, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            if needs_critic:
                loss = loss + stack.critic(input_ids, attention_mask)[:, prompt_len - 1 : -1].square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = {key.removeprefix("time/"): value for key, value in timer.pop().items()}
    seconds["total_s"] = sum(seconds.values())
    return seconds


def iteration_seconds(rows: list[dict]) -> list[float]:
    """Wall seconds of each RL row's iteration: from the previous row to this one, its evaluation
    excluded (the trainer evaluates at the last iteration whatever eval_every is)."""
    return [
        row["time/elapsed_s"] - prev["time/elapsed_s"] - row.get("time/eval_s", 0.0)
        for prev, row in itertools.pairwise(rows)
    ]


def phase_keys(rows: list[dict]) -> list[str]:
    """The iteration's ``time/<phase>_s`` keys (evaluation and the wall clock left out): in log order,
    each phase followed by its sub-phases."""
    keys = dict.fromkeys(k for row in rows for k in row if k.startswith("time/"))
    keys = [k for k in keys if k != "time/elapsed_s" and not k.startswith("time/eval")]
    order = {k: i for i, k in enumerate(keys)}

    def parent(key: str) -> str:
        return f"time/{key.removeprefix('time/').split('/')[0].removesuffix('_s')}_s"

    return sorted(keys, key=lambda k: (order.get(parent(k), -1), k != parent(k)))


def is_top_level(key: str) -> bool:
    return "/" not in key.removeprefix("time/")


def bench_iteration(overrides: list[str], iterations: int, warmup: int) -> dict:
    cfg = compose_config(
        [
            f"rollout.eval_every={NEVER}",
            f"checkpoint_every={NEVER}",
            *overrides,
            f"iterations={warmup + iterations}",
            "total_samples=null",
        ]
    )
    device = setup_device(cfg)
    rows, collector, algorithm = train_and_record(cfg, device)
    memory = peak_memory_mb(device)
    stack = collector.stack
    batches = collector.batches[warmup:]  # one per iteration, in order

    optimizer = torch.optim.AdamW(stack.parameter_groups(algorithm.lr))
    minibatches = [bare_minibatches(r, algorithm, cfg.seed) for r in batches]
    lower_bound(collector, stack, batches[0], minibatches[0], optimizer, algorithm.needs_critic)  # warm-up
    bounds = [
        lower_bound(collector, stack, r, mbs, optimizer, algorithm.needs_critic)
        for r, mbs in zip(batches, minibatches)
    ]
    return {
        "algorithm": algorithm.name,
        "model": cfg.model.name,
        "device": str(device),
        "overrides": overrides,
        "shape": {
            "samples_per_iteration": cfg.rollout.samples_per_iteration,
            "samples_per_prompt": algorithm.source.samples_per_prompt,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "ppo_epochs": algorithm.ppo_epochs,
            "minibatch_size": algorithm.minibatch_size,
            "minibatches_per_epoch": len(minibatches[0]) // algorithm.ppo_epochs,
            "needs_critic": algorithm.needs_critic,
        },
        "warmup": warmup,
        "memory": memory,
        **summarize(rows, warmup, batches, bounds, algorithm.ppo_epochs),
    }


def summarize(
    rows: list[dict], warmup: int, batches: list[Rollouts], bounds: list[dict], epochs: int
) -> dict:
    """Per measured iteration: its phases, wall time, lower bound, tokens and shapes; then the spread of
    each over the iterations, the ratios to the bound, throughputs, and evaluation's phases apart."""
    # rows[0] is the evaluation of the SFT policy, then one row per iteration
    measured_rows = rows[1 + warmup :]
    per_iteration = []
    seconds = iteration_seconds(rows)[warmup:]
    for prev, row, wall, bound, r in zip(rows[warmup:], measured_rows, seconds, bounds, batches):
        phases = {k: row.get(k, 0.0) for k in phase_keys(measured_rows)}
        per_iteration.append(
            {
                "iteration": row["iteration"],
                "iteration_s": wall,
                "phases": phases,
                "phases_top_level_sum_s": sum(v for k, v in phases.items() if is_top_level(k)),
                "lower_bound": bound,
                "generated_tokens": row["tokens"] - prev["tokens"],
                # real (non-pad) prompt + response tokens through forward and backward, every epoch
                "training_tokens": epochs * int(r.attention_mask.sum()),
                "rows": len(r),
                "prompt_width": r.prompt_ids.shape[1],
                "response_width": r.response_ids.shape[1],
            }
        )

    def over(value: Callable[[dict], float]) -> dict[str, float]:
        return spread([value(it) for it in per_iteration])

    phases = {k: over(lambda it, k=k: it["phases"][k]) for k in phase_keys(measured_rows)}
    bound = {k: over(lambda it, k=k: it["lower_bound"][k]) for k in bounds[0]}
    iteration = over(lambda it: it["iteration_s"])
    frozen_bound = sum(v["median"] for k, v in bound.items() if k.endswith("forward_s"))
    eval_rows = [row for row in rows if "time/eval_s" in row]
    evaluation = {
        k: spread([row[k] for row in eval_rows if k in row])
        for k in dict.fromkeys(k for row in eval_rows for k in row if k.startswith("time/eval"))
    }
    return {
        "batch_shape": {k: over(lambda it, k=k: it[k]) for k in ("rows", "prompt_width", "response_width")},
        "iteration_s": iteration,
        "phases": phases,
        "lower_bound": bound,
        # medians, and the minimums' ratio: each side's least disturbed run, steadier on a shared machine
        "ratio": {
            "iteration": iteration["median"] / bound["total_s"]["median"],
            "iteration_of_minimums": iteration["min"] / bound["total_s"]["min"],
            "generate": phases["time/rollout/generate_s"]["median"] / bound["generate_s"]["median"],
            "rollout": phases["time/rollout_s"]["median"] / (bound["generate_s"]["median"] + frozen_bound),
            "update": phases["time/update_s"]["median"] / bound["update_s"]["median"],
        },
        "tokens_per_s": {
            "generated": over(lambda it: it["generated_tokens"] / it["iteration_s"]),
            "generate_phase": over(
                lambda it: it["generated_tokens"] / it["phases"]["time/rollout/generate_s"]
            ),
            "generate_bound": over(lambda it: it["generated_tokens"] / it["lower_bound"]["generate_s"]),
            "training": over(lambda it: it["training_tokens"] / it["phases"]["time/update_s"]),
            "training_bound": over(lambda it: it["training_tokens"] / it["lower_bound"]["update_s"]),
        },
        "eval": evaluation,
        "per_iteration": per_iteration,
    }


def run_iteration(args: argparse.Namespace, overrides: list[str]) -> dict:
    names = args.algorithms.split(",") if args.algorithms else [None]
    results = [
        bench_iteration([*overrides, *([f"algorithm={n}"] if n else [])], args.iterations, args.warmup)
        for n in names
    ]
    return {"machine": machine(torch.device(results[0]["device"])), "results": results}


def iteration_tables(report: dict) -> str:
    results = report["results"]

    def cell(s: dict) -> str:
        return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"

    summary = markdown_table(
        [
            "algorithm",
            "iteration s",
            "lower bound s",
            "ratio (of min)",
            "gen tok/s",
            "train tok/s",
            "peak MB",
        ],
        [
            [
                r["algorithm"],
                cell(r["iteration_s"]),
                cell(r["lower_bound"]["total_s"]),
                f"{r['ratio']['iteration']:.2f} ({r['ratio']['iteration_of_minimums']:.2f})",
                f"{r['tokens_per_s']['generated']['median']:.0f}",
                f"{r['tokens_per_s']['training']['median']:.0f}",
                f"{r['memory']['peak_mb']:.0f}",
            ]
            for r in results
        ],
    )
    keys = list(
        dict.fromkeys(k for r in results for k in [*r["phases"], *(f"bound/{b}" for b in r["lower_bound"])])
    )

    def phase_cell(r: dict, key: str) -> str:
        stats = (
            r["lower_bound"].get(key.removeprefix("bound/"))
            if key.startswith("bound/")
            else r["phases"].get(key)
        )
        return cell(stats) if stats else ""

    phases = markdown_table(
        ["phase (median [min, max] s)", *(r["algorithm"] for r in results)],
        [[key, *(phase_cell(r, key) for r in results)] for key in keys]
        + [[f"ratio/{k}", *(f"{r['ratio'][k]:.2f}" for r in results)] for k in results[0]["ratio"]],
    )
    return f"{summary}\n\n{phases}"


# --------------------------------------------------------------------------- sft


def bench_sft_mode(
    cfg: DictConfig, base: str | Path, pairs: list, pad: int, packing: bool, steps: int, warmup: int
) -> dict:
    """``warmup`` + ``steps`` SFT steps (loss, backward, clip, AdamW) on one mode's batches, in order
    (round again when there are fewer)."""
    device = resolve_device(cfg.engine.device)
    rows, collate = sft_train_rows(pairs, packing, cfg.model.max_length, pad)
    size = cfg.sft.batch_size
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    batches = [collate(chunk) for chunk in itertools.islice(itertools.cycle(chunks), warmup + steps)]
    reset_peak_memory(device)
    torch.manual_seed(cfg.sft.seed)
    model = load_causal_lm(base, cfg.model.dtype, cfg.model.trust_remote_code).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr)
    timer = PhaseTimer(device)
    step_s, real, positions = [], [], []
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with timer.phase("step"):
            nll, n = sft_loss(model, batch)
            (nll / n.clamp(min=1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.sft.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = timer.pop()["time/step_s"]
        if i >= warmup:
            step_s.append(seconds)
            real.append(int(batch["attention_mask"].sum()))
            positions.append(batch["input_ids"].numel())
    steps_per_epoch = math.ceil(len(rows) / size)
    return {
        "packing": packing,
        "rows": len(rows),
        "steps_per_epoch": steps_per_epoch,
        "step_s": spread(step_s),
        "real_tokens_per_s": sum(real) / sum(step_s),
        "positions_per_s": sum(positions) / sum(step_s),
        "pad_fraction": 1 - sum(real) / sum(positions),
        "epoch_s_estimate": steps_per_epoch * float(np.median(step_s)),
        "memory": peak_memory_mb(device),
    }


def run_sft(args: argparse.Namespace, overrides: list[str]) -> dict:
    cfg = compose_config(overrides)
    device = setup_device(cfg)
    task = instantiate(cfg.task)
    base = build_base(cfg, task)  # the model SFT starts from; SFT itself is not run
    tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
    pairs, _ = encode_rows(
        tokenizer, task.sft_examples("train"), "response", cfg.model.max_length, "SFT train"
    )
    modes = [
        bench_sft_mode(cfg, base, pairs, tokenizer.pad_token_id, packing, args.steps, args.warmup)
        for packing in (False, True)
    ]
    return {
        "machine": machine(device),
        "model": cfg.model.name,
        "overrides": overrides,
        "batch_size": cfg.sft.batch_size,
        "max_length": cfg.model.max_length,
        "modes": modes,
        "speedup": modes[1]["real_tokens_per_s"] / modes[0]["real_tokens_per_s"],
    }


def sft_table(report: dict) -> str:
    table = markdown_table(
        ["sft", "step s (median)", "real tok/s", "pad fraction", "steps/epoch", "epoch s (est.)", "peak MB"],
        [
            [
                "packed" if m["packing"] else "padded",
                f"{m['step_s']['median']:.4f}",
                f"{m['real_tokens_per_s']:.0f}",
                f"{m['pad_fraction']:.2f}",
                str(m["steps_per_epoch"]),
                f"{m['epoch_s_estimate']:.1f}",
                f"{m['memory']['peak_mb']:.0f}",
            ]
            for m in report["modes"]
        ],
    )
    return f"{table}\n\npacked / padded real tokens per second: {report['speedup']:.2f}"


# --------------------------------------------------------------------------- memory


def distinct_bytes(*modules: nn.Module) -> int:
    """Parameter and buffer bytes of ``modules``, each storage counted once (tied and shared weights)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for module in modules
        for t in itertools.chain(module.parameters(), module.buffers())
    }
    return sum(storages.values())


def peak_bytes(device: torch.device) -> int:
    return round(peak_memory_mb(device)["peak_mb"] * 2**20)


def random_minibatch(vocab_size: int, cfg: DictConfig, device: torch.device) -> Rollouts:
    """An update minibatch of random token ids, no padding: algorithm.minibatch_size rows of
    model.max_length tokens, the last rollout.max_new_tokens of them the response."""
    rows, response_len = cfg.algorithm.minibatch_size, cfg.rollout.max_new_tokens
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(vocab_size, (rows, cfg.model.max_length), generator=generator).to(device)
    prompt, response = ids[:, :-response_len], ids[:, -response_len:]  # [b, P], [b, T]
    zeros = torch.zeros(rows, device=device)
    return Rollouts(
        prompt_ids=prompt,
        prompt_mask=torch.ones_like(prompt),
        response_ids=response,
        response_mask=torch.ones_like(response),
        group=torch.arange(rows, device=device),
        logprobs=zeros,
        ref_logprobs=zeros,
        kl=zeros,
        scores=zeros,
        rewards=zeros,
    )


def rollout_passes(stack: PolicyStack, rollouts: Rollouts) -> None:
    """Each role's pass of a rollout, without grad: actor and reference log-probs, values, scores."""
    stack.old_logprobs(rollouts)
    stack.reference_logprobs(rollouts)
    stack.score(rollouts)
    with torch.no_grad():
        response_values(stack.critic, rollouts)


def update_step(stack: PolicyStack, rollouts: Rollouts) -> None:
    """The actor's and critic's forward, backward and AdamW step, as ppo_gae's update takes them."""
    optimizer = torch.optim.AdamW(stack.parameter_groups(1e-5))
    out = stack(rollouts, values=True)
    (out.values.square().mean() - out.logprobs.mean()).backward()
    optimizer.step()


def measure_memory(sft: str, reward: str | None, cfg_container: dict) -> dict[str, int]:
    """Run in a fresh process. The weights held, and the peak memory over the process's size before:
    of the policy stack built from the ``reward`` artifact through each role's rollout pass, then
    through an update too; with no ``reward``, of the SFT model alone through one no-grad pass, then
    through one LoRA training step (forward, backward, AdamW: what fine-tuning one model costs)."""
    cfg = OmegaConf.create(cfg_container)
    # glibc's own policy, as MEASURED_ENV sets it: an allocator that keeps freed blocks would hold the
    # rollout's peak through the update and count it there
    device = setup_device(cfg, keep_freed=False)
    reset_peak_memory(device)
    before = peak_bytes(device)  # the interpreter and its imports
    if reward is None:
        model = load_causal_lm(sft, cfg.model.dtype, cfg.model.trust_remote_code).to(device)
        minibatch = random_minibatch(model.config.vocab_size, cfg, device)
        with torch.no_grad():
            response_logprobs(model, minibatch)
        rollout_peak, tensor_bytes = peak_bytes(device) - before, distinct_bytes(model)
        model = add_lora(with_gradient_checkpointing(model, cfg.model.gradient_checkpointing), cfg.peft)
        disable_dropout(model).train()  # train mode: the one in which checkpointed layers recompute
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        response_logprobs(model, minibatch)[0].mean().backward()
        optimizer.step()
        return {
            "tensor_bytes": tensor_bytes,
            "rollout_peak_bytes": rollout_peak,
            "train_peak_bytes": peak_bytes(device) - before,
        }
    stack = build_policy_stack(sft, reward, reward, cfg.model).to(device)  # the critic from the reward model
    rollouts = random_minibatch(stack.actor.config.vocab_size, cfg, device)
    rollout_passes(stack, rollouts)
    rollout_peak = peak_bytes(device) - before
    update_step(stack, rollouts)
    return {
        "tensor_bytes": distinct_bytes(stack, stack.reference, stack.reward),
        "rollout_peak_bytes": rollout_peak,
        "update_peak_bytes": peak_bytes(device) - before,
    }


# glibc: allocations from 64 KiB up are mapped on their own and returned when freed, so the resident
# high-water mark follows the live tensors, not what the allocator keeps cached (ignored elsewhere)
MEASURED_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a spawned process, so that its peak memory is its own and not this process's."""
    context = multiprocessing.get_context("spawn")
    with mock.patch.dict(os.environ, MEASURED_ENV), ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def save_reward_models(cfg: DictConfig, base: str | Path, folder: Path) -> dict[str, Path]:
    """An (untrained) reward model on ``base`` per storage mode: a whole model, or a LoRA adapter."""
    paths = {}
    for mode in ("none", "lora_multi_adapter"):
        model = ValueModel.from_causal_lm(
            base, cfg.reward.pooling, cfg.model.dtype, cfg.model.trust_remote_code
        )
        if mode == "lora_multi_adapter":
            model.body = add_lora(model.body, cfg.peft)
        paths[mode] = folder / mode
        model.save_pretrained(paths[mode])
    return paths


def run_memory(args: argparse.Namespace, overrides: list[str]) -> dict:
    # the adapters' settings are peft=lora_multi_adapter's (overridable: peft.r=16)
    cfg = compose_config([*overrides, "peft=lora_multi_adapter"])
    device = setup_device(cfg)
    base = build_base(cfg, instantiate(cfg.task))  # the model, untrained: memory does not depend on values
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    results = []
    with tempfile.TemporaryDirectory() as folder:
        rewards = save_reward_models(cfg, base, Path(folder))
        for checkpointing in (False, True):
            cfg.model.gradient_checkpointing = checkpointing
            container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            one = in_fresh_process(measure_memory, str(base), None, container)
            for mode, path in rewards.items():
                measured = in_fresh_process(measure_memory, str(base), str(path), container)
                # the fields analysis/claims/source_000.py multi_adapter_memory reads, a file per result
                result = {
                    "mode": mode,
                    "gradient_checkpointing": checkpointing,
                    "peak_bytes": measured["rollout_peak_bytes"],
                    "one_model_bytes": one["rollout_peak_bytes"],
                    "update_peak_bytes": measured["update_peak_bytes"],
                    "one_model_train_bytes": one["train_peak_bytes"],
                    "tensor_bytes": measured["tensor_bytes"],
                    "one_model_tensor_bytes": one["tensor_bytes"],
                    "measure": peak_memory_mb(device)["kind"],
                    "model": cfg.model.name,
                    "seed": cfg.seed,
                    "environment": environment(device),  # date, commit, machine: FINDINGS.md cites them
                }
                args.out.mkdir(parents=True, exist_ok=True)
                variant = "-checkpointing" if checkpointing else ""
                file = args.out / f"memory_{mode}{variant}-{stamp}.json"
                file.write_text(json.dumps(result, indent=2) + "\n")
                results.append({**result, "path": str(file)})
    return {
        "machine": machine(device),
        "model": cfg.model.name,
        "overrides": overrides,
        "minibatch": {"rows": cfg.algorithm.minibatch_size, "tokens": cfg.model.max_length},
        "results": results,
    }


def memory_table(report: dict) -> str:
    def mb(n: int) -> str:
        return f"{n / 2**20:.1f}"

    def ratio(n: int, one: int) -> str:  # a tiny model can leave the process's peak where it was
        return f"{n / one:.2f}" if one else "n/a"

    rows = []
    for r in report["results"]:
        one_tensors, one_peak, one_train = (
            r["one_model_tensor_bytes"],
            r["one_model_bytes"],
            r["one_model_train_bytes"],
        )
        rows.append(
            [
                f"{r['mode']}{' + checkpointing' if r['gradient_checkpointing'] else ''}",
                mb(r["tensor_bytes"]),
                ratio(r["tensor_bytes"], one_tensors),
                mb(r["peak_bytes"]),
                ratio(r["peak_bytes"], one_peak),
                mb(r["update_peak_bytes"]),
                f"{ratio(r['update_peak_bytes'], one_train)} ({mb(one_train)} MB)",
            ]
        )
    header = [
        "roles",
        "weights MB",
        "x one model",
        "rollout peak MB",
        "x one model's no-grad pass",
        "+ update peak MB",
        "x one model's LoRA training step",
    ]
    measure = report["results"][0]["measure"]
    return f"{markdown_table(header, rows)}\n\npeak: {measure} over the process's size before loading"


# --------------------------------------------------------------------------- sweep


SWEEP_PHASES = ("stages", "best_of_n", "rl")


def job_breakdown(job: Path) -> dict[str, float]:
    """One job's seconds: the whole job, its phases, evaluation within RL, and the rest of the job."""
    summary = json.loads((job / "summary.json").read_text())
    times = {phase: float(summary.get(f"time/{phase}_s", 0.0)) for phase in SWEEP_PHASES}
    history = job / "history.jsonl"
    rows = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    times["eval"] = sum(float(row.get("time/eval_s", 0.0)) for row in rows if "iteration" in row)
    times["job"] = float(summary["time/job_s"])
    times["rest_of_job"] = times["job"] - sum(times[phase] for phase in SWEEP_PHASES)
    return times


def run_sweep(args: argparse.Namespace, overrides: list[str]) -> dict:
    folder = args.keep or Path(tempfile.mkdtemp(prefix="sweep-benchmark-"))
    sweep_dir = folder / "sweep"
    own_cache = not any(o.startswith("paths.artifacts=") for o in overrides)
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "-m",
        *overrides,
        *([f"paths.artifacts={folder / 'artifacts'}"] if own_cache else []),
        "hydra/launcher=local_parallel",
        f"hydra.launcher.n_jobs={args.workers}",
        f"hydra.sweep.dir={sweep_dir}",
        "~hydra.callbacks.sweep_report",  # the jobs are timed, not the analysis after them
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"the sweep failed, see {sweep_dir} ({' '.join(command)}):\n{result.stderr[-3000:]}"
        )
    # the analysis's job folders: a job's stage records (stages/<artifact>/) are no jobs
    jobs = {str(job.relative_to(sweep_dir.resolve())): job_breakdown(job) for job in job_folders([sweep_dir])}
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    totals = {
        key: sum(job[key] for job in jobs.values()) for key in (*SWEEP_PHASES, "eval", "rest_of_job", "job")
    }
    # seconds of the workers not spent inside a job: process start, imports, launcher, waiting
    totals["outside_jobs"] = wall * args.workers - totals["job"]
    return {
        "machine": machine(torch.device("cpu")),
        "sweep": command,
        "workers": args.workers,
        "wall_s": wall,
        "jobs": len(jobs),
        "jobs_per_hour": 3600 * len(jobs) / wall,
        "totals_s": totals,
        "per_job": jobs,
    }


SWEEP_ROWS = (
    ("stages (build or load)", "stages"),
    ("best-of-n reference", "best_of_n"),
    ("RL training, evaluation excluded", "train"),
    ("evaluation", "eval"),
    ("rest of the job (config, task, W&B, models)", "rest_of_job"),
    ("outside the jobs (process start, imports, launcher)", "outside_jobs"),
)


def sweep_table(report: dict) -> str:
    spent = {**report["totals_s"], "train": report["totals_s"]["rl"] - report["totals_s"]["eval"]}
    jobs, worker_s = report["jobs"], report["wall_s"] * report["workers"]
    rows = [
        [name, f"{spent[key]:.1f}", f"{spent[key] / jobs:.2f}", f"{spent[key] / worker_s:.0%}"]
        for name, key in SWEEP_ROWS
    ]
    head = (
        f"{jobs} jobs in {report['wall_s']:.1f} s on {report['workers']} workers: "
        f"{report['jobs_per_hour']:.0f} jobs per hour\n\n"
    )
    return head + markdown_table(["where", "total s", "s per job", "share of worker time"], rows)


# --------------------------------------------------------------------------- report and CLI


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_report(out: Path, command: str, report: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def parser() -> argparse.ArgumentParser:
    """One subparser per subcommand, each with its ``run(args, overrides) -> report`` and ``table``."""
    main_parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark", description=__doc__.split("\n")[0]
    )
    commands = main_parser.add_subparsers(dest="command", required=True)

    iteration = commands.add_parser("iteration", help="phases of an RL iteration against a lower bound")
    iteration.add_argument(
        "--algorithms", help="comma-separated, e.g. ppo_gae,ppo_sampled,rrhf (default: the config's)"
    )
    iteration.add_argument("--iterations", type=int, default=5, help="measured iterations (after warm-up)")
    iteration.set_defaults(run=run_iteration, table=iteration_tables)

    sft = commands.add_parser("sft", help="SFT real tokens per second, padded vs packed")
    sft.add_argument("--steps", type=int, default=20, help="measured steps per mode (after warm-up)")
    sft.set_defaults(run=run_sft, table=sft_table)

    memory = commands.add_parser("memory", help="peak memory of the four roles: full models vs LoRA adapters")
    memory.set_defaults(run=run_memory, table=memory_table)

    sweep = commands.add_parser("sweep", help="a real sweep end to end: jobs per hour, where their time goes")
    sweep.add_argument("--workers", type=int, default=2, help="the local parallel launcher's n_jobs")
    sweep.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    sweep.set_defaults(run=run_sweep, table=sweep_table)

    for sub in (iteration, sft):
        sub.add_argument("--warmup", type=int, default=1, help="unmeasured iterations or steps first")
    for sub in (iteration, sft, memory, sweep):
        sub.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. model=gpt2_124m_shape")
        sub.add_argument("--out", type=Path, default=Path("outputs/benchmarks"), help="where the JSON goes")
    return main_parser


def main(argv: list[str] | None = None) -> Path:
    """Run one subcommand; print its tables and return the path of its JSON report."""
    cli = parser()
    # overrides may sit before or after the options: argparse leaves the later ones unparsed
    args, rest = cli.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        cli.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = [*args.overrides, *rest]
    load_at_start = os.getloadavg()[0]
    report = {"command": args.command, "argv": sys.argv[1:] if argv is None else list(argv)}
    report.update(args.run(args, overrides))
    report["machine"]["load_average_1min_at_start"] = load_at_start
    path = write_report(args.out, args.command, report)
    print(args.table(report))
    print(f"\nreport: {path}")
    return path


def cli() -> None:
    """``python -m experiments.benchmark`` and the ``sandbox-bench`` console script: the report's path
    is printed, and the exit status is 0."""
    main()


if __name__ == "__main__":
    cli()
