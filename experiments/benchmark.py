"""Where the time of training goes, measured against a lower bound of the same work done bare.

    python -m experiments.benchmark iteration [OVERRIDES...] [--algorithms ppo_gae,ppo_sampled,rrhf]
        [--iterations 5] [--warmup 1] [--out outputs/benchmarks]
    python -m experiments.benchmark sft [OVERRIDES...] [--steps 20] [--warmup 1]

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
in the bound: generation could return those log-probs.

``sft`` times SFT steps on padded examples and on packed blocks (``sft.packing``) and reports
real (non-pad) tokens per second.

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
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from algorithms.base import Algorithm
from backbone.batch import Batch, Rollouts
from backbone.config import register_configs
from backbone.engine import configure_cpu_threads, resolve_device
from backbone.models import PolicyStack, load_causal_lm, load_tokenizer, position_ids
from backbone.rng import seed_everything
from backbone.rollout import RolloutCollector
from backbone.stages import build_base, encode_rows, prepare_stages, sft_loss, sft_train_rows
from backbone.timing import PhaseTimer
from backbone.tracking import Tracker
from backbone.trainer import Trainer
from experiments.run import build_collector

CONF = Path(__file__).resolve().parents[1] / "conf"
NEVER = 10**9  # an evaluation or checkpoint interval that no benchmark reaches

register_configs()


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides)


def setup_device(cfg: DictConfig) -> torch.device:
    transformers.utils.logging.disable_progress_bar()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.engine.device)
    configure_cpu_threads(device, cfg.engine.cpu_threads)
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
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mb": kib / 1024, "kind": "rss_high_water"}


def machine(device: torch.device) -> dict:
    """What the numbers were measured on, and how busy it was (1-minute load average; the benchmark's
    own process counts about 1 of it)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
    if algorithm.offline:
        raise ValueError(
            f"{algorithm.name}: an offline algorithm generates its whole budget before the first "
            "iteration, so its iterations have no rollout to time; benchmark mode=online"
        )
    stages = prepare_stages(cfg, task, lambda row: None)
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
            Trainer(cfg, task, algorithm, collector, tracker, run_dir).run()
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
            "samples_per_prompt": algorithm.samples_per_prompt,
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
    """One subparser per subcommand, each with its ``run(args, overrides) -> report`` and ``table``;
    ``memory`` (multi-adapter LoRA memory) is to join them the same way."""
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

    for sub in (iteration, sft):
        sub.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. model=gpt2_124m_shape")
        sub.add_argument("--warmup", type=int, default=1, help="unmeasured iterations or steps first")
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


if __name__ == "__main__":
    main()
