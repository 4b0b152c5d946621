"""PTX: a language-modelling loss mixed into the RL loss, and the held-out losses that show what RL costs.

    L = L_algorithm + ptx.coef * L_LM(next minibatch of the source's train texts)

(InstructGPT eq. 2; DeepSpeed-Chat's unsupervised term.) ``ptx.source`` names the texts:

- ``sft``: the task's SFT train split, loss on the response tokens (the SFT loss). The
  demonstrations are what RL moves the policy away from to earn reward, so this pulls straight
  against the reward.
- ``pretrain``: the task's pretraining corpus (``Task.pretrain_texts``), text that is not the RL
  objective (toy_reviews' product notes; a text dataset, ``task.pretrain``, for a preference task).
  The loss is plain next-token loss on every token of a text x_1..x_n (x_n = EOS):

      L_LM = - sum_texts sum_{t=1..n} log p(x_t | x_0..x_{t-1}) / (tokens in the minibatch)

  where x_0, the context of the first token, is the tokenizer's BOS (EOS where it has none, as
  GPT-2 separates documents). Texts longer than model.max_length are cut at the right. PTX can
  only keep what the policy knew: a tiny model knows the corpus when SFT trained on it too
  (``sft.mix_pretrain``), as a real one knows its pretraining text.

Held-out losses are logged at every evaluation whatever the coefficient (at 0 they are the
control arm's): ``eval/sft_loss`` on the SFT eval split always, and with ``source=pretrain``
``eval/pretrain_loss`` on the pretraining eval split, the language ability the policy keeps
(or loses) beside the reward it optimises.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from backbone.models import pad_pairs
from backbone.stages import encode_rows, encode_texts, mean_sft_loss, pretrain_texts, sft_loss
from backbone.tasks.base import Task

PTX_SOURCES = ("sft", "pretrain")


class PTXMixer:
    """The stream of PTX minibatches from ``source``'s train rows, and the held-out losses."""

    def __init__(
        self,
        task: Task,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        coef: float,
        source: str,
        batch_size: int,
        device: torch.device,
        seed: int,
    ):
        self.coef = coef
        self.batch_size = batch_size
        self.device = device
        self.pad = tokenizer.pad_token_id
        # source -> the rows of a split
        rows = {
            "sft": lambda split: encode_rows(
                tokenizer, task.sft_examples(split), "response", max_length, f"SFT {split}"
            )[0],
            "pretrain": lambda split: encode_texts(
                tokenizer, pretrain_texts(task, split), max_length, f"pretrain {split}"
            ),
        }
        # metric name -> held-out rows, scored at every evaluation
        self.held_out = {"sft_loss": rows["sft"]("eval")}
        if source == "pretrain":
            self.held_out["pretrain_loss"] = rows["pretrain"]("eval")
        self.train = rows[source]("train") if coef > 0 else []
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> dict[str, Tensor]:
        """The next minibatch of train rows, padded (``pad_pairs``): an endless stream, reshuffled
        every time the rows left run short of a batch."""
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.train), generator=self.generator).tolist()
        rows, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return {k: v.to(self.device) for k, v in pad_pairs([self.train[i] for i in rows], self.pad).items()}

    def loss(self, actor: nn.Module) -> Tensor:
        """L_LM of the next minibatch: mean -log p per scored token."""
        nll, n = sft_loss(actor, self.next_batch())
        return nll / n.clamp(min=1)

    def eval_losses(self, actor: nn.Module, prefix: str) -> dict[str, float]:
        """Mean -log p per scored token of each held-out split: ``<prefix>/sft_loss`` (and
        ``<prefix>/pretrain_loss``)."""
        return {
            f"{prefix}/{name}": mean_sft_loss(actor, rows, self.pad, self.device, self.batch_size * 4)
            for name, rows in self.held_out.items()
        }

    def state_dict(self) -> dict:
        return {"order": list(self.order), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order = list(state["order"])
        self.generator.set_state(state["generator"])
