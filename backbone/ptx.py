"""PTX: the SFT (language-modelling) loss on demonstrations, mixed into the RL loss.

    L = L_algorithm + ptx_coef * L_SFT(next minibatch of the task's SFT train split)

(InstructGPT eq. 2; DeepSpeed-Chat's unsupervised term.) The held-out SFT loss (the task's
SFT eval split) is logged at every evaluation as ``eval/sft_loss`` whatever the
coefficient: how much of its language ability the policy keeps while it optimises reward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from backbone.models import pad_pairs
from backbone.stages import encode_rows, mean_sft_loss, sft_loss
from backbone.tasks.base import Task


class SFTMixer:
    def __init__(
        self,
        task: Task,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        coef: float,
        batch_size: int,
        device: torch.device,
        seed: int,
    ):
        self.coef = coef
        self.batch_size = batch_size
        self.device = device
        self.pad = tokenizer.pad_token_id
        self.held_out, _ = encode_rows(
            tokenizer, task.sft_examples("eval"), "response", max_length, "SFT eval"
        )
        self.train = []
        if coef > 0:
            self.train, _ = encode_rows(
                tokenizer, task.sft_examples("train"), "response", max_length, "PTX train"
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def loss(self, actor: nn.Module) -> Tensor:
        """Mean -log p per response token of the next minibatch of demonstrations (endless, reshuffled)."""
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.train), generator=self.generator).tolist()
        rows, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        batch = {k: v.to(self.device) for k, v in pad_pairs([self.train[i] for i in rows], self.pad).items()}
        nll, n = sft_loss(actor, batch)
        return nll / n.clamp(min=1)

    def eval_loss(self, actor: nn.Module) -> float:
        return mean_sft_loss(actor, self.held_out, self.pad, self.device, self.batch_size * 4)

    def state_dict(self) -> dict:
        return {"order": list(self.order), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order = list(state["order"])
        self.generator.set_state(state["generator"])
