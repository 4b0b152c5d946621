"""The policy stack as one base model with LoRA adapters (``peft=lora_multi_adapter``).

One causal LM, the SFT model, is held once. PEFT LoRA adapters on its body give the roles:
``actor`` (the LM with its adapter), ``critic`` and ``reward`` (the body's last hidden state
through the adapter, then the role's value head, a small ``nn.Linear`` outside PEFT), and the
reference is the base with every adapter disabled. Four roles for about the memory of one model.

Where the weights come from:
- SFT trains the full weights as in ``peft=none``; its model is the base, never changed here.
- The reward-model stage trains the reward adapter and its head on that base
  (``reward_model.init=sft``); the artifact is the adapter in PEFT's own format beside the head.
- The actor adapter starts at zero (LoRA's B = 0), so at step 0 the actor is the base, and the
  reference (adapters disabled) is exactly the SFT model: KL 0 and a first PPO ratio of 1.
- The critic adapter and head are a copy of a reward model's (``critic.init=reward``: the run's own;
  ``reward_last`` / ``reward_mean``: one the reward-model stage trained with that pooling, an adapter
  on the same SFT base with the same LoRA settings), or fresh (``critic.init=sft``, a zero adapter:
  the SFT body).

PEFT runs one adapter per forward, so each role makes its adapter active for its pass and the
actor's and critic's passes of one loss run one after the other, each keeping its graph. PEFT's
``set_adapter`` (and leaving ``disable_adapter``) also makes only the active adapter trainable;
``Adapters`` undoes that after every switch, so both trainable adapters get their gradients and
the reward adapter and the base never do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from backbone.models import PolicyStack, ValueModel, is_value_model, load_causal_lm, value_metadata

INIT_SEED = 0  # of the adapters' random start, see build_lora_policy_stack


def lora_config(model: nn.Module, peft_cfg) -> LoraConfig:
    """The LoRA settings of ``peft.*``; ``fan_in_fan_out`` where the targets are Conv1D (GPT-2's c_attn
    stores its weight [in, out])."""
    targets = list(peft_cfg.target_modules)
    conv1d = any(
        isinstance(module, Conv1D)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    )
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
    )


def add_lora(body: PreTrainedModel, peft_cfg) -> PeftModel:
    """``body`` frozen under one fresh adapter (PEFT's ``default``), the only part that trains."""
    return get_peft_model(body, lora_config(body, peft_cfg))


def adapter_key(name: str) -> re.Pattern:
    """Matches the parameter names of one adapter: PEFT names them ``...c_attn.lora_A.<name>.weight``."""
    return re.compile(rf"\.lora_\w+\.{re.escape(name)}(\.|$)")


def adapter_parameters(peft: PeftModel, name: str) -> list[nn.Parameter]:
    """One adapter's parameters, by name, whatever their requires_grad says at the moment."""
    key = adapter_key(name)
    return [p for n, p in peft.named_parameters() if key.search(n)]


def load_adapter_weights(peft: PeftModel, name: str, folder: Path) -> None:
    """An adapter saved by PEFT into the adapter ``name``, in place (an optimiser holds its tensors)."""
    state = load_file(folder / SAFETENSORS_WEIGHTS_NAME)
    result = set_peft_model_state_dict(peft, state, adapter_name=name)
    missing = [k for k in result.missing_keys if adapter_key(name).search(k)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder}: the adapter does not match {name!r} (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}); was it written by another config?"
        )


class Adapters:
    """The named adapters of one PEFT model: which one is active, and which ones train.

    Trainability is fixed here, not by activity: after every switch exactly the ``trainable``
    adapters require grad (PEFT's switch would leave only the active one trainable).
    """

    def __init__(self, peft: PeftModel, trainable: list[str]):
        self.peft = peft
        self.trainable = trainable

    def activate(self, name: str) -> None:
        self.peft.set_adapter(name, inference_mode=True)  # every adapter frozen ...
        self.peft.set_requires_grad(self.trainable, True)  # ... then the trainable ones thawed

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """``name`` active for the block (None: every adapter disabled, the base), then the one before."""
        previous = self.peft.active_adapter
        try:
            if name is None:
                with self.peft.disable_adapter():
                    yield
            else:
                self.activate(name)
                yield
        finally:
            self.activate(previous)


class AdapterValueModel(ValueModel):
    """A value model whose body is the shared base under one adapter, active for each of its passes."""

    def __init__(self, adapters: Adapters, adapter: str, pooling: str, metadata: dict | None = None):
        super().__init__(adapters.peft.get_base_model(), pooling, metadata)
        self.adapters = adapters
        self.adapter = adapter

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with self.adapters.using(self.adapter):
            return super().forward(input_ids, attention_mask)  # [B, L]


class AdaptersDisabled(nn.Module):
    """The causal LM with every adapter disabled: the SFT model, i.e. the reference."""

    def __init__(self, lm: PreTrainedModel, adapters: Adapters):
        super().__init__()
        self.lm = lm
        self.adapters = adapters

    def forward(self, **kwargs):
        with self.adapters.using(None):
            return self.lm(**kwargs)


class LoraPolicyStack(PolicyStack):
    """The policy stack over one base model with adapters ``actor``, ``critic`` and ``reward``.

    ``actor`` is the causal LM itself, whose active adapter is the actor's except during another
    role's pass (each switches to its own and back), so generation, the log-prob passes, PTX and
    EMA use it as they would a full model. The optimiser gets the actor's and critic's adapters
    (and the critic's head), found by name.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        adapters: Adapters,
        reward: AdapterValueModel,
        critic: AdapterValueModel | None = None,
        gradient_checkpointing: bool = False,
        values_per: str = "token",
    ):
        # freezing the reference and the reward model freezes the base they share, every adapter
        # with it (the critic's head is its own) ...
        super().__init__(
            lm, AdaptersDisabled(lm, adapters), reward, critic, gradient_checkpointing, values_per
        )
        self.adapters = adapters
        # ... so the trainable adapters are thawed again, with the actor's active
        adapters.activate("actor")

    def recompute_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """Backward recomputes a checkpointed layer after its role's pass has switched back to the
        actor: the recompute must run under the adapter its forward ran under."""
        return nullcontext(), self.adapters.using(self.adapters.peft.active_adapter)

    def role_parameters(self, role: str) -> list[nn.Parameter]:
        """A role's adapter, and the critic's head."""
        params = adapter_parameters(self.adapters.peft, role)
        return params + list(self.critic.head.parameters()) if role == "critic" else params

    def save_trainable(self, folder: Path) -> None:
        """The actor's and critic's adapters in PEFT's format (``actor/``, ``critic/``), the critic's
        head beside its adapter."""
        self.adapters.peft.save_pretrained(folder, selected_adapters=self.adapters.trainable)
        if self.critic is not None:
            self.critic.save_head(folder / "critic")

    def load_trainable(self, folder: Path) -> None:
        for name in self.adapters.trainable:
            load_adapter_weights(self.adapters.peft, name, folder / name)
        if self.critic is not None:
            self.critic.load_head(folder / "critic")


def build_lora_policy_stack(
    sft_path: str | Path,
    reward_path: str | Path,
    critic_from: str | Path | None,
    model_cfg,
    values_per: str = "token",
) -> LoraPolicyStack:
    """The SFT model with a fresh actor adapter, the reward artifact's adapter and head, and the
    critic's: ``critic_from``'s adapter and head when it is a reward-model artifact, fresh when it is
    the SFT model, none when None. Actor and critic take the reward adapter's LoRA settings: the run's
    ``peft.*``, which key the reward artifacts.

    The fresh weights (LoRA's A, a fresh critic head) are drawn from a fixed seed, as the SFT model
    under them is fixed: a run's RL stream must not depend on whether its stages were built in its
    own process or read from the cache (the global RNG is left as it was).
    """
    lm = load_causal_lm(sft_path, model_cfg.dtype, model_cfg.trust_remote_code).requires_grad_(False)
    config = LoraConfig.from_pretrained(str(reward_path))
    config.inference_mode = False  # PEFT saves adapters marked for inference
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        peft = get_peft_model(lm.base_model, config, adapter_name="actor")
        adapters = Adapters(peft, ["actor"] if critic_from is None else ["actor", "critic"])
        reward = adapter_value_model(adapters, "reward", reward_path)
        critic = None
        if critic_from is not None and is_value_model(critic_from):
            critic = adapter_value_model(adapters, "critic", critic_from)
        elif critic_from is not None:
            peft.add_adapter("critic", config)
            critic = AdapterValueModel(adapters, "critic", reward.pooling)
    return LoraPolicyStack(lm, adapters, reward, critic, model_cfg.gradient_checkpointing, values_per)


def adapter_value_model(adapters: Adapters, name: str, folder: str | Path) -> AdapterValueModel:
    """A saved LoRA value model (adapter and head) as the adapter ``name`` on the shared base; the
    critic's is trainable."""
    adapters.peft.load_adapter(str(folder), adapter_name=name, is_trainable=name in adapters.trainable)
    meta = value_metadata(folder)
    model = AdapterValueModel(adapters, name, meta.pop("pooling"), meta)
    model.load_head(folder)
    return model
