"""The sandbox's models as plain Hugging Face models, for use outside it.

- The policy: a causal LM; a LoRA adapter (``peft=lora_multi_adapter``) is merged into its base.
- A value model (reward model, critic): ``AutoModelForSequenceClassification`` with ``num_labels=1``,
  whose score is the sandbox's value at the last attended token.

The sandbox's head is ``w.h + b`` on the body's last hidden state ``h``, read at the last attended
position. ``<Arch>ForSequenceClassification`` reads ``score(h) = w.h`` (no bias) at the rightmost token
that is not ``pad_token_id``. So the export

- copies the body, and ``w`` into ``score``;
- folds ``b`` into the bias of the layer that makes ``h`` (GPT-2's and GPT-NeoX's final LayerNorm):
  ``w.(h + b w / |w|^2) = w.h + b``; a model whose last layer has no bias (LLaMA's RMSNorm) is refused
  unless ``b = 0``;
- gives a tokenizer whose pad token is its EOS a pad token of its own (and the embeddings a row for it):
  the sandbox scores the EOS that closes a response, which the HF class would skip as padding;
- saves the tokenizer padding on the right: these HF models number positions from the first column and
  the sandbox from the first attended one, which agree when no padding is on the left (else pass
  ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)``).

Mean pooling has no HF counterpart and is refused. Every value-model export is checked: it must score
a padded probe batch as the sandbox's value model does, or nothing is exported.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from backbone.models import (
    ValueModel,
    is_adapter,
    last_position,
    load_causal_lm,
    torch_dtype,
    value_metadata,
)

PAD_TOKEN = "<|pad|>"  # added where the pad token is the EOS


def causal_lm(base: str | Path, adapter: Path | None, model_cfg) -> PreTrainedModel:
    """The causal LM at ``base``, with ``adapter`` (a PEFT LoRA adapter on its body, as
    ``backbone.lora`` trains it) merged into its weights when given."""
    lm = load_causal_lm(base, model_cfg.dtype, model_cfg.trust_remote_code)
    if adapter is not None:
        PeftModel.from_pretrained(lm.base_model, str(adapter)).merge_and_unload()  # in place
    return lm


def value_model(path: Path, base: str | Path, model_cfg) -> ValueModel:
    """A saved value model: a whole body, or (``peft=lora_multi_adapter``) an adapter on ``base``'s
    body, merged, under the saved head."""
    if not is_adapter(path):
        return ValueModel.from_pretrained(path, model_cfg.dtype, model_cfg.trust_remote_code)
    body = AutoModel.from_pretrained(
        str(base),
        dtype=torch_dtype(model_cfg.dtype),
        use_safetensors=True,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    body = PeftModel.from_pretrained(body, str(path)).merge_and_unload()
    meta = value_metadata(path)
    model = ValueModel(body, meta.pop("pooling"), meta)
    model.load_head(path)
    return model.eval()


def sequence_classifier(
    values: ValueModel, tokenizer: PreTrainedTokenizerBase, what: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``values`` as ``AutoModelForSequenceClassification`` (``num_labels=1``) scoring the value at the
    last token, and the tokenizer to use with it (see the module docstring). ``what`` names the model
    in errors."""
    body, head = values.body, values.head
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    config = copy.deepcopy(body.config)
    config.num_labels = 1
    config.architectures = None
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=body.dtype).eval()
    classifier.base_model.load_state_dict(body.state_dict())
    if len(tokenizer) > classifier.get_input_embeddings().num_embeddings:
        # the new pad's row (never attended)
        classifier.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    classifier.config.pad_token_id = tokenizer.pad_token_id  # where the classifier reads the score
    score = getattr(classifier, "score", None)
    if not isinstance(score, nn.Linear) or score.bias is not None:
        raise ValueError(
            f"{what}: {type(classifier).__name__} has no bias-free `score` layer to hold the value head"
        )
    with torch.no_grad():
        score.weight.copy_(head.weight)
        _fold_bias(classifier, head, what)
    check_scores(values, classifier, tokenizer, what)
    return classifier, tokenizer


def _fold_bias(classifier: PreTrainedModel, head: nn.Linear, what: str) -> None:
    """Adds ``b w / |w|^2`` to the bias of the layer whose output is the last hidden state."""
    bias = head.bias.item()
    if bias == 0.0:
        return
    last, module_name = _last_layer(classifier.base_model)
    target = getattr(last, "bias", None)
    if not isinstance(target, Tensor) or target.shape != head.weight.shape[1:]:
        raise ValueError(
            f"{what}: its value head has a bias ({bias:.4g}) that {type(classifier).__name__} "
            f"cannot hold: its `score` has no bias and the last layer ({module_name}, {type(last).__name__}) "
            "has none to fold it into"
        )
    weight = head.weight[0].to(target.dtype)
    target.add_(bias * weight / weight.square().sum())


def _last_layer(body: PreTrainedModel) -> tuple[nn.Module, str]:
    """The leaf module whose output is the body's last hidden state (found by running it once)."""
    calls: list[tuple[str, nn.Module, Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, _, out, name=name: calls.append((name, m, out)))
        for name, module in body.named_modules()
        if not list(module.children())
    ]
    try:
        ids = torch.zeros((1, 2), dtype=torch.long, device=body.device)
        with torch.no_grad():
            hidden = body(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    for name, module, out in reversed(calls):
        if isinstance(out, Tensor) and out.shape == hidden.shape and torch.equal(out, hidden):
            return module, name
    return body, type(body).__name__


@torch.no_grad()
def check_scores(
    values: ValueModel, classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, what: str
) -> None:
    """The classifier must score a right-padded probe batch (every response closed by EOS) as the value
    model does at each sequence's last token."""
    generator = torch.Generator().manual_seed(0)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(values.body.config.vocab_size) if i not in special][:500])
    lengths = [5, 3, 1, 4]
    ids = torch.full((len(lengths), max(lengths)), tokenizer.pad_token_id)  # [B, L]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        picks = vocab[torch.randint(len(vocab), (n,), generator=generator)]
        ids[row, :n] = torch.cat([picks[:-1], torch.tensor([tokenizer.eos_token_id])])
        mask[row, :n] = 1
    # pads are masked out: any id does for the value model, which lacks a pad the export added
    expected = last_position(values(ids.masked_fill(mask == 0, 0), mask), mask)  # [B]
    got = classifier(input_ids=ids, attention_mask=mask).logits[:, 0].float()  # [B]
    tolerance = 1e-4 if values.body.dtype == torch.float32 else 2e-2
    if not torch.allclose(got, expected, atol=tolerance, rtol=tolerance):
        raise ValueError(
            f"{what}: the exported {type(classifier).__name__} scores {got.tolist()} where the sandbox's "
            f"value model scores {expected.tolist()}; not exported"
        )
