"""An exponential moving average of the actor's weights (DeepSpeed-Chat's ``--enable_ema``).

    theta_ema <- decay * theta_ema + (1 - decay) * theta        after every optimiser step

The trainer evaluates the EMA weights beside the live ones (``eval_ema/*``) by swapping
them into the actor for the evaluation and back, so no second model is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay}: expected 0 <= decay < 1")
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)  # ema + (1 - decay) (theta - ema)

    @contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the EMA weights for the duration of the block, its own weights after."""
        live = [p.detach().clone() for p in model.parameters()]
        for p, e in zip(model.parameters(), self.shadow):
            p.copy_(e)
        try:
            yield model
        finally:
            for p, saved in zip(model.parameters(), live):
                p.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for e, saved in zip(self.shadow, state["shadow"], strict=True):
            e.copy_(saved)
