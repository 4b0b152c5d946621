"""The RL stage's four roles, loaded from the stage artifacts: separate full models (``peft=none``),
or one base with LoRA adapters (``peft=lora_multi_adapter``, backbone/lora.py). Both kinds of stack
build on backbone/models.py; choosing between them is this module's only job."""

from __future__ import annotations

from pathlib import Path

from backbone.lora import build_lora_policy_stack
from backbone.models import PolicyStack, ValueModel, is_adapter, is_value_model, load_causal_lm


def build_policy_stack(
    sft_path: str | Path,
    reward_path: str | Path,
    critic_from: str | Path | None,
    model_cfg,
    values_per: str = "token",
) -> PolicyStack:
    """Load the four roles from the SFT and reward-model artifacts: full models (``peft=none``), or,
    when the reward model is a LoRA adapter (``peft=lora_multi_adapter``), one base with adapters.

    ``critic_from`` is where the critic starts (``critic.init``, resolved by ``prepare_stages``): a
    reward-model artifact, whose body and head it copies, or the SFT model, whose body it takes under
    a fresh head; None: no critic. ``values_per``: see ``PolicyStack``."""
    if is_adapter(reward_path):
        return build_lora_policy_stack(sft_path, reward_path, critic_from, model_cfg, values_per)
    kwargs = {"dtype": model_cfg.dtype, "trust_remote_code": model_cfg.trust_remote_code}
    actor = load_causal_lm(sft_path, **kwargs)
    reference = load_causal_lm(sft_path, **kwargs)
    reward = ValueModel.from_pretrained(reward_path, **kwargs)
    critic = None
    if critic_from is not None and is_value_model(critic_from):
        critic = ValueModel.from_pretrained(critic_from, **kwargs)
    elif critic_from is not None:
        critic = ValueModel.from_causal_lm(critic_from, pooling=reward.pooling, **kwargs)
    return PolicyStack(actor, reference, reward, critic, model_cfg.gradient_checkpointing, values_per)
