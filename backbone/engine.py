"""The one place that knows how parameters are stepped: optimiser, schedule, clipping, ranks.

Actor and critic share one AdamW with a parameter group per role (built once by the policy
stack), so one engine holds both, as the design recommends over a one-model-per-engine wrapper.

- ``TorchEngine``: plain PyTorch on one device.
- ``DeepSpeedEngine`` (``engine=deepspeed_zero1|2|3``): the same optimiser and schedule handed
  to ``deepspeed.initialize`` with a JSON config built from ``engine.*`` and ``optim.*`` (and a
  user's JSON, ``engine.deepspeed_config``, merged over it); DeepSpeed all-reduces gradients over
  the ranks, clips, partitions (ZeRO) and steps.

Both skip a step whose gradient is not finite (``step`` returns None): weights, optimiser
moments and schedule stay as they were. Both save and load their own resume state.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from backbone import distributed
from backbone.checkpoint import restore_weights

ENGINE_STATE_FILE = "engine.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one (the rank's own GPU under a launcher), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def cpu_threads(setting: int | str, parallel_jobs: int = 1) -> int:
    """``engine.cpu_threads`` as a number: ``auto`` shares the cores this process may use between
    the jobs running at once (a parallel launcher's) and the ranks on this machine, at least one
    each; 0 leaves torch's default."""
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
            raise ValueError(
                f"engine.cpu_threads={setting!r}: expected auto or a number of threads (0: torch's default)"
            )
        return setting
    cores = len(os.sched_getaffinity(0))
    local_ranks = int(
        os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1))
    )  # torchrun, deepspeed
    return max(1, cores // (max(1, parallel_jobs) * local_ranks))


def configure_cpu(device: torch.device, threads: int, keep_freed: bool = True) -> None:
    """On CPU: intra-op threads (``cpu_threads``' number; 0 leaves torch's default), and an
    allocator that keeps what it frees (``keep_freed_memory``; not with ``keep_freed=False``, where
    the resident set must follow the live tensors: the memory benchmark)."""
    if device.type == "cpu":
        if threads > 0:
            torch.set_num_threads(threads)
        if keep_freed:
            keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit


def keep_freed_memory() -> bool:
    """glibc's malloc maps each block over its mmap threshold on its own and returns it to the
    kernel when freed, and trims the heap's free top: every iteration's activations, KV caches and
    gradients then fault their pages in again (at the 4x256 benchmark shape, 10% of an iteration).
    Blocks up to 32 MiB come from the heap instead and the heap is not trimmed, so the process
    keeps its peak resident. True where applied (glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base LR at each optimiser step: linear warm-up, then the schedule."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"optim.scheduler={schedule!r}: expected constant, linear or cosine")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def adamw_with_schedule(param_groups: list[dict], optim_cfg, total_steps: int):
    # fused: one kernel for every parameter's update instead of a dozen ops per tensor, which at the
    # tiny model's sizes took a fifth of the update (the same AdamW up to float rounding)
    optimizer = torch.optim.AdamW(
        param_groups,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim_cfg.scheduler, optim_cfg.warmup_steps, total_steps)
    )
    return optimizer, scheduler


def micro_batch_size(minibatch_size: int) -> int:
    """Each rank's share of an update minibatch (DeepSpeed's ``train_micro_batch_size_per_gpu``)."""
    return max(1, minibatch_size // distributed.world_size())


def build_engine(stack: nn.Module, param_groups: list[dict], cfg, total_steps: int, minibatch_size: int):
    if cfg.engine.name == "deepspeed":
        micro_batch = micro_batch_size(minibatch_size)
        return DeepSpeedEngine(stack, param_groups, cfg.optim, total_steps, cfg.engine, micro_batch)
    return TorchEngine(stack, param_groups, cfg.optim, total_steps)


class TorchEngine:
    def __init__(self, model: nn.Module, param_groups: list[dict], optim_cfg, total_steps: int):
        self.model = model
        self.grad_clip = optim_cfg.grad_clip
        self.optimizer, self.scheduler = adamw_with_schedule(param_groups, optim_cfg, total_steps)
        self.params = [p for group in param_groups for p in group["params"]]

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Clip, step, advance the schedule; returns the gradient norm before clipping. A non-finite
        norm (a NaN or inf anywhere in the gradient) skips the step: weights, optimiser moments
        and schedule stay as they were, and None is returned."""
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True))  # one pass
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm if finite else None

    def learning_rates(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def gathered(self) -> contextlib.AbstractContextManager:
        """The full trainable weights, readable inside the block (they always are here)."""
        return contextlib.nullcontext()

    def save_checkpoint(self, folder: Path) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, folder / ENGINE_STATE_FILE)

    def load_checkpoint(self, folder: Path, stack) -> None:
        """Weights from the checkpoint's Hugging Face export, optimiser and schedule from its state."""
        restore_weights(stack, folder)
        state = torch.load(folder / ENGINE_STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# what the trainer's loop relies on: one optimiser step per minibatch, its own AdamW and schedule, the
# ZeRO stage it gathers weights for. A user's JSON may repeat these, not change them.
FIXED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "zero_optimization.stage",
)


def deepspeed_config(engine_cfg, optim_cfg, micro_batch_size: int) -> dict:
    """DeepSpeed's JSON config: built from the Hydra config, then the user's JSON
    (``engine.deepspeed_config``) merged over it, the user's keys winning (``merge_config``)
    except ``FIXED_KEYS``, which it may not change. One optimiser step per minibatch: the
    trainer accumulates nothing, so DeepSpeed's batch sizes only describe a minibatch."""
    built = _built_deepspeed_config(engine_cfg, optim_cfg, micro_batch_size)
    if engine_cfg.deepspeed_config is None:
        return built
    path = Path(engine_cfg.deepspeed_config)
    merged = merge_config(built, read_json_object(path))
    changed = [key for key in FIXED_KEYS if _select(merged, key) != _select(built, key)]
    if changed:
        raise ValueError(
            f"engine.deepspeed_config={path}: {', '.join(changed)} cannot change (the sandbox sets them: "
            "one optimiser step per algorithm.minibatch_size, its AdamW and schedule from optim.*, the ZeRO "
            "stage from engine.zero_stage)"
        )
    return merged


def merge_config(base: dict, override: dict) -> dict:
    """``override`` merged over ``base``, recursively: where both hold a dict under a key, the dicts are
    merged; anywhere else (scalars, lists) the override's value replaces the base's."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object, or a ValueError naming the file and what is wrong."""
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"engine.deepspeed_config={path}: cannot be read ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"engine.deepspeed_config={path}: not valid JSON ({error})") from error
    if not isinstance(value, dict):
        found = type(value).__name__
        raise ValueError(f"engine.deepspeed_config={path}: expected a JSON object, found {found}")
    return value


def _select(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _built_deepspeed_config(engine_cfg, optim_cfg, micro_batch_size: int) -> dict:
    zero: dict = {"stage": engine_cfg.zero_stage}
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if engine_cfg.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim_cfg.grad_clip or 0.0,
        "zero_optimization": zero,
        # the trainer's own AdamW (one parameter group per role), not a DeepSpeed-built one
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": engine_cfg.precision == "bf16"},
        "fp16": {"enabled": engine_cfg.precision == "fp16", "loss_scale": 0},
        "steps_per_print": 2**31 - 1,
    }


class DeepSpeedEngine:
    def __init__(
        self,
        model: nn.Module,
        param_groups: list[dict],
        optim_cfg,
        total_steps: int,
        engine_cfg,
        micro_batch: int,
    ):
        import deepspeed  # lazy: a single-process run never needs it

        self.zero_stage = engine_cfg.zero_stage
        self.config = deepspeed_config(engine_cfg, optim_cfg, micro_batch)
        optimizer, scheduler = adamw_with_schedule(param_groups, optim_cfg, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.params = [p for group in param_groups for p in group["params"]]

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        """DeepSpeed reduces, clips and steps; at ZeRO 1-3 it skips a step whose gradient is not
        finite on any rank (weights and schedule untouched), which ``was_step_applied`` reports."""
        self.engine.step()
        if not self.engine.was_step_applied():
            return None
        return float(self.engine.get_global_grad_norm())

    def learning_rates(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """ZeRO-3 partitions the weights over the ranks: gather them for the block (every rank
        must enter it). Below stage 3 every rank holds them whole."""
        if self.zero_stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
            yield

    def save_checkpoint(self, folder: Path) -> None:
        """DeepSpeed's own checkpoint (every rank writes its shards); the config beside it."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        if distributed.is_main():
            (folder / "deepspeed" / "ds_config.json").write_text(json.dumps(self.config, indent=2))

    def load_checkpoint(self, folder: Path, stack) -> None:
        """Weights, optimiser and schedule, each rank its own shards."""
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
