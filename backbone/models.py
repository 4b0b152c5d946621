"""Tokenizers and models: build the tiny ones, load any with from_pretrained, and the policy stack.

The policy stack holds the four roles of RLHF: actor (trained), reference (frozen SFT),
reward model (frozen) and critic (trained; initialised from the reward model by default).
Every log-prob and value the sandbox uses is computed here, by one function each, so the
rollout's old log-probs and the loss's new ones come from the same computation and the
first PPO ratio is exactly 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.activations import GELUTanh, NewGELUActivation

from backbone.batch import PolicyOutput, Rollouts
from backbone.ops import masked_mean

log = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_META_FILE = "value_model.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's CONFIG_NAME

# --------------------------------------------------------------------------- tokenizers


def train_word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over whitespace-separated words, wrapped for transformers."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """AutoTokenizer with a pad token (EOS when the model has none) and left padding for generation."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int, add_eos: bool = True
) -> tuple[list[int], list[int], bool]:
    """Prompt and response tokenised separately (EOS closes the response).

    Returns (prompt_ids, response_ids, truncated). A pair longer than ``max_length`` loses
    the prompt's left end first (the response is what is scored); a response that alone
    exceeds it is cut at the right, keeping at least one prompt token.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    excess = len(prompt_ids) + len(response_ids) - max_length
    if excess <= 0:
        return prompt_ids, response_ids, False
    keep_prompt = max(1, len(prompt_ids) - excess)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
    return prompt_ids, response_ids[: max_length - len(prompt_ids)], True


def pad_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Prompts left-padded, responses right-padded: every response starts at column P.

    Returns input_ids, attention_mask and response_mask, each [B, P + T].
    """
    p_len = max(len(p) for p, _ in pairs)
    t_len = max(len(r) for _, r in pairs)
    batch = len(pairs)
    input_ids = torch.full((batch, p_len + t_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, p_len + t_len), dtype=torch.long)
    response_mask = torch.zeros((batch, p_len + t_len), dtype=torch.long)
    for i, (prompt, response) in enumerate(pairs):
        start = p_len - len(prompt)
        input_ids[i, start:p_len] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, p_len : p_len + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, start : p_len + len(response)] = 1
        response_mask[i, p_len : p_len + len(response)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


# --------------------------------------------------------------------------- causal LMs


def build_tiny_causal_lm(tokenizer: PreTrainedTokenizerBase, cfg) -> GPT2LMHeadModel:
    """A GPT-2-shaped model from the model config's n_layer / n_embd / n_head / n_positions."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        n_head=cfg.n_head,
        n_positions=cfg.n_positions,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def with_gradient_checkpointing(model: PreTrainedModel, enabled: bool, context_fn=None) -> PreTrainedModel:
    """Recompute activations in backward when ``enabled`` (transformers does so in train mode only;
    non-reentrant, so gradients also pass layers whose inputs are frozen, as under LoRA).
    ``context_fn``: torch's checkpoint hook, the contexts of a layer's forward and of its recompute."""
    if enabled:
        kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers before the rename (5.17 has only the old name)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def load_causal_lm(
    path: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """AutoModelForCausalLM from safetensors weights; the same path for tiny and real models."""
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return with_gradient_checkpointing(fuse_activations(model), gradient_checkpointing)


def fuse_activations(model: nn.Module) -> nn.Module:
    """GPT-2's ``gelu_new`` (tanh GELU written as seven elementwise ops, each a pass over the MLP's
    [B, T, 4d] activations, forward and backward) becomes torch's one-kernel tanh GELU: the same
    function up to float rounding, and a fifth less time in a 4x256 model's forward + backward on
    CPU. Modules are replaced in place; the saved config keeps its name, so the weights load
    anywhere as before."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
    return model


def max_positions(path: str | Path, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a saved model's position embeddings allow; None when its config has no limit."""
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, pads clamped to 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: Tensor, labels: Tensor, entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """log p(label) and (when asked) the entropy of p at each position; logits [B, T, V], labels [B, T].

    The entropy is a statistic, never a loss term: it is computed without grad, so the update loop
    keeps no [B, T, V] graph for it.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    chosen = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    if not entropy:
        return chosen, None
    with torch.no_grad():
        return chosen, -(logp.exp() * logp).sum(-1)  # [B, T]


def response_logits(model: PreTrainedModel, rollouts: Rollouts) -> Tensor:
    """The logits that predict the response tokens, [B, T, V]: logits at P-1+t predict token P+t.

    Only the last T+1 positions go through the LM head (``logits_to_keep``): the prompt's logits
    would be [B, P, V] of compute and memory that nothing reads. The slice below is from the right,
    so it picks the same positions from a model that returns every position's logits.
    """
    response_len = rollouts.response_ids.shape[1]
    mask = rollouts.attention_mask
    return model(
        input_ids=rollouts.input_ids,
        attention_mask=mask,
        position_ids=position_ids(mask),
        logits_to_keep=response_len + 1,
    ).logits[:, -(response_len + 1) : -1]  # [B, T, V]


def response_logprobs(
    model: PreTrainedModel, rollouts: Rollouts, entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Log-probs and entropies of the response tokens, [B, T], 0 on pads."""
    logprobs, ent = token_logprobs(response_logits(model, rollouts), rollouts.response_ids, entropy)
    response_mask = rollouts.response_mask
    return logprobs * response_mask, ent * response_mask if ent is not None else None


# --------------------------------------------------------------------------- value models


class ValueModel(nn.Module):
    """A transformer body with a linear head: one value per position.

    The reward model pools it to a score per sequence: the value at the last non-pad
    position (``last``: trlx, DeepSpeed-Chat) or the mean over response positions
    (``mean``: early ColossalAI). The critic reads it per position.
    """

    def __init__(self, body: PreTrainedModel, pooling: str = "last", metadata: dict | None = None):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"reward.pooling={pooling!r}: expected 'last' or 'mean'")
        self.body = fuse_activations(body)
        self.pooling = pooling
        # the width of the last hidden state: the embeddings' (OPT-350m projects its 1024 down to 512)
        hidden = body.get_input_embeddings().embedding_dim
        self.head = nn.Linear(hidden, 1, dtype=body.dtype)
        # small head (lm-human-preferences: N(0, 1/sqrt(d+1))) so initial scores are near 0
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.metadata = dict(metadata or {})

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).last_hidden_state  # [B, L, D]
        return self.head(hidden).squeeze(-1).float()  # [B, L]

    def pool(self, values: Tensor, attention_mask: Tensor, response_mask: Tensor | None = None) -> Tensor:
        """[B, L] values -> [B] scores."""
        if self.pooling == "last":
            return last_position(values, attention_mask)
        mask = attention_mask if response_mask is None else response_mask
        return (values * mask).sum(1) / mask.sum(1).clamp(min=1)

    def score(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor | None = None) -> Tensor:
        return self.pool(self(input_ids, attention_mask), attention_mask, response_mask)

    @classmethod
    def from_causal_lm(
        cls,
        path: str | Path,
        pooling: str = "last",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
    ) -> ValueModel:
        """The body of a saved causal LM (its LM head dropped) with a fresh value head."""
        body = AutoModel.from_pretrained(
            str(path), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
        return cls(with_gradient_checkpointing(body, gradient_checkpointing), pooling)

    def save_pretrained(self, path: str | Path, **metadata) -> None:
        """The body in its own format (a whole model, or a PEFT adapter), then the head and metadata."""
        self.body.save_pretrained(path)
        self.save_head(path, **metadata)

    def save_head(self, path: str | Path, **metadata) -> None:
        path = Path(path)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, path / VALUE_HEAD_FILE)
        self.metadata.update(metadata)
        meta = {"pooling": self.pooling, **self.metadata}
        (path / VALUE_META_FILE).write_text(json.dumps(meta, indent=2))

    def load_head(self, path: str | Path) -> None:
        """A saved head's weights, copied into this head in place."""
        self.head.load_state_dict(load_file(Path(path) / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: str = "float32", trust_remote_code: bool = False
    ) -> ValueModel:
        meta = value_metadata(path)
        body = AutoModel.from_pretrained(
            str(path), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
        model = cls(body, meta.pop("pooling"), metadata=meta)
        model.load_head(path)
        return model


def last_position(values: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, L] values -> [B]: each row's value at its last attended position (pads on either side)."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * columns).argmax(dim=1)  # [B]
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def value_metadata(path: str | Path) -> dict:
    """A saved value model's pooling and metadata (the reward model's score statistics)."""
    return json.loads((Path(path) / VALUE_META_FILE).read_text())


def is_value_model(path: str | Path) -> bool:
    """Whether a folder holds a saved value model (a reward-model artifact), not a causal LM."""
    return (Path(path) / VALUE_META_FILE).exists()


def is_adapter(path: str | Path) -> bool:
    """Whether a saved value model's body is a PEFT adapter (``peft=lora_multi_adapter``), not a model."""
    return (Path(path) / ADAPTER_CONFIG_FILE).exists()


def response_values(critic: ValueModel, rollouts: Rollouts) -> Tensor:
    """V of the state before each response token, [B, T]: the value at position P-1+t."""
    prompt_len = rollouts.prompt_ids.shape[1]
    values = critic(rollouts.input_ids, rollouts.attention_mask)  # [B, P + T]
    return values[:, prompt_len - 1 : -1] * rollouts.response_mask


def sequence_values(critic: ValueModel, rollouts: Rollouts) -> Tensor:
    """One value per sequence, [B]: the values at every prompt and response position averaged, pads
    masked (ColossalAI-Chat's coati critic)."""
    mask = rollouts.attention_mask  # [B, P + T]
    return masked_mean(critic(rollouts.input_ids, mask), mask, dim=1)


CRITIC_VALUES = {"token": response_values, "sequence": sequence_values}  # by Algorithm.values_per


# --------------------------------------------------------------------------- the policy stack


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in every mode: ``nn.Dropout`` modules and the rates layers apply themselves
    (LLaMA's and GPT-NeoX's ``attention_dropout``, OPT's ``dropout`` and ``layerdrop``), so that
    train mode computes what eval mode does."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop"):
                setattr(module, name, 0.0)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class PolicyStack(nn.Module):
    """Actor, reference, reward model and critic as separate full models (``peft=none``).

    Only actor and critic are trainable; both sit in this module so one optimiser (and one
    engine) holds them. Every pass runs in eval mode: dropout would make the first ratio
    differ from 1 and the KL to the reference non-zero at step 0. With ``gradient_checkpointing``
    the loss pass (``forward``) alone runs actor and critic in train mode, the one mode in which
    transformers recomputes a layer's activations in backward; their dropout is switched off,
    so that pass computes what eval mode does. ``values_per`` is how the algorithm reads the critic
    (``Algorithm.values_per``): per response token, or one value per sequence.
    """

    def __init__(
        self,
        actor: PreTrainedModel,
        reference: PreTrainedModel,
        reward: ValueModel,
        critic: ValueModel | None = None,
        gradient_checkpointing: bool = False,
        values_per: str = "token",
    ):
        super().__init__()
        if values_per not in CRITIC_VALUES:
            raise ValueError(f"values_per={values_per!r}: expected one of {list(CRITIC_VALUES)}")
        self.actor = actor.eval()
        self.critic = critic.eval() if critic is not None else None
        self.values_per = values_per
        self.checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            for model in self.trainable_models():
                disable_dropout(with_gradient_checkpointing(model, True, self.recompute_contexts))
        # frozen roles are kept out of the module tree's parameters() so optimisers and
        # engines never see them
        self._frozen = {"reference": freeze(reference), "reward": freeze(reward)}

    @property
    def reference(self) -> PreTrainedModel:
        return self._frozen["reference"]

    @property
    def reward(self) -> ValueModel:
        return self._frozen["reward"]

    def to(self, *args, **kwargs) -> PolicyStack:
        super().to(*args, **kwargs)
        for model in self._frozen.values():
            model.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> PolicyStack:
        return super().train(False)  # see the class docstring: always eval mode

    def recompute_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """The contexts of a checkpointed layer's forward and of its recompute in backward."""
        return nullcontext(), nullcontext()

    def trainable_models(self) -> list[PreTrainedModel]:
        return [self.actor] + ([self.critic.body] if self.critic is not None else [])

    def forward(self, rollouts: Rollouts, values: bool = False) -> PolicyOutput:
        """The loss pass: log-probs and entropy of the responses [B, T], and critic values when asked."""
        if values and self.critic is None:
            raise RuntimeError("values were asked for but this policy stack has no critic")
        with self.checkpointed():
            logprobs, entropy = response_logprobs(self.actor, rollouts)
            if not values:
                return PolicyOutput(logprobs, entropy)
            return PolicyOutput(logprobs, entropy, self.critic_values(rollouts))

    def critic_values(self, rollouts: Rollouts) -> Tensor:
        """The critic's values as the algorithm reads them: [B, T], or [B] per sequence."""
        return CRITIC_VALUES[self.values_per](self.critic, rollouts)

    @contextmanager
    def checkpointed(self) -> Iterator[None]:
        """Train mode for the block when gradient checkpointing is on (see the class docstring)."""
        if not self.checkpointing:
            yield
            return
        models = self.trainable_models()
        for model in models:
            model.train()
        try:
            yield
        finally:
            for model in models:
                model.eval()

    @torch.no_grad()
    def old_logprobs(self, rollouts: Rollouts) -> Tensor:
        """The sampling policy's log-probs, by the same computation as the loss's."""
        return response_logprobs(self.actor, rollouts, entropy=False)[0]

    @torch.no_grad()
    def reference_logprobs(self, rollouts: Rollouts) -> Tensor:
        return response_logprobs(self.reference, rollouts, entropy=False)[0]

    @torch.no_grad()
    def actor_logits(self, rollouts: Rollouts) -> Tensor:
        """The sampling policy's logits at the response positions, [B, T, V]: a separate forward."""
        return response_logits(self.actor, rollouts)

    @torch.no_grad()
    def reference_logits(self, rollouts: Rollouts) -> Tensor:
        return response_logits(self.reference, rollouts)  # [B, T, V]

    @torch.no_grad()
    def score(self, rollouts: Rollouts) -> Tensor:
        """Reward-model score per response, [B], pooled as the reward model was trained."""
        p_len = rollouts.prompt_ids.shape[1]
        response_mask = torch.zeros_like(rollouts.attention_mask)
        response_mask[:, p_len:] = rollouts.response_mask
        return self.reward.score(rollouts.input_ids, rollouts.attention_mask, response_mask)

    def parameter_groups(self, lr: float, critic_lr: float | None = None) -> list[dict]:
        """Optimiser groups named by role, built once (so no role is silently left out)."""
        groups = [{"name": "actor", "params": self.role_parameters("actor"), "lr": lr}]
        if self.critic is not None:
            groups.append({"name": "critic", "params": self.role_parameters("critic"), "lr": critic_lr or lr})
        return groups

    def role_parameters(self, role: str) -> list[nn.Parameter]:
        """What the optimiser trains of a role (actor or critic): here its whole model."""
        return [p for p in getattr(self, role).parameters() if p.requires_grad]

    def save_trainable(self, folder: Path) -> None:
        """The actor (and critic) in Hugging Face format, each usable alone with ``from_pretrained``."""
        self.actor.save_pretrained(folder / "actor")
        if self.critic is not None:
            self.critic.save_pretrained(folder / "critic")

    def load_trainable(self, folder: Path) -> None:
        """``save_trainable``'s weights, copied into the models in place (the optimiser holds them)."""
        load_safetensors(self.actor, folder / "actor")
        if self.critic is not None:
            load_safetensors(self.critic.body, folder / "critic", skip=(VALUE_HEAD_FILE,))
            self.critic.load_head(folder / "critic")


def load_safetensors(model: nn.Module, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Every ``*.safetensors`` shard of a ``save_pretrained`` folder into ``model``. Tied
    parameters (an LM head sharing the embedding) are saved once; the rest must match exactly."""
    state: dict[str, Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name not in skip:
            state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    named = model.state_dict(keep_vars=True)
    loaded = {id(tensor) for name, tensor in named.items() if name in state}
    untied = [name for name in missing if id(named[name]) not in loaded]
    if untied or unexpected:
        raise ValueError(
            f"{folder}: the checkpoint does not match the model "
            f"(missing {untied[:5]}, unexpected {unexpected[:5]}); was it written by another config?"
        )
