"""The one place that knows how parameters are stepped: optimiser, schedule, clipping.

``TorchEngine`` is plain PyTorch on one device. Actor and critic share one AdamW (with a
parameter group per role, built once by the policy stack), so a distributed engine can
wrap them as one model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def configure_cpu_threads(device: torch.device, threads: int) -> None:
    """Intra-op threads on CPU. OpenMP threads spin while they wait, so two threads per job
    collapse (10-50x slower steps) as soon as another busy process shares the cores."""
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


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


class TorchEngine:
    def __init__(self, model: nn.Module, param_groups: list[dict], optim_cfg, total_steps: int):
        self.model = model
        self.grad_clip = optim_cfg.grad_clip
        self.optimizer = torch.optim.AdamW(
            param_groups, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(optim_cfg.scheduler, optim_cfg.warmup_steps, total_steps)
        )
        self.params = [p for group in param_groups for p in group["params"]]

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Clip, step, advance the schedule; returns the gradient norm before clipping. A non-finite
        norm (a NaN or inf anywhere in the gradient) skips the step: weights, optimiser moments
        and schedule stay as they were, and None is returned."""
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm if finite else None

    def learning_rates(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
