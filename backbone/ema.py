"""An exponential moving average of the actor's weights (DeepSpeed-Chat's ``--enable_ema``).

    theta_ema <- decay * theta_ema + (1 - decay) * theta        after every optimiser step

It follows the parameters the optimiser trains: the actor's whole weights, or under
``peft=lora_multi_adapter`` its adapter alone (frozen weights never move, so their average is
themselves, and the base is not copied). The trainer evaluates the EMA weights beside the live
ones (``eval_ema/*``) by swapping them in for the evaluation and back, so no second model is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, params: Iterable[nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay}: expected 0 <= decay < 1")
        self.decay = decay
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        live = [p.detach() for p in self.params]
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)  # ema + (1 - decay) (theta - ema)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The EMA weights in the parameters for the duration of the block, the live ones after."""
        live = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, self.shadow):
            p.copy_(e)
        try:
            yield
        finally:
            for p, saved in zip(self.params, live):
                p.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for e, saved in zip(self.shadow, state["shadow"], strict=True):
            e.copy_(saved)
