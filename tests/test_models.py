"""Tokenizer, model loading, log-probs and values: against direct computations."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backbone.batch import Rollouts
from backbone.models import (
    PolicyStack,
    ValueModel,
    build_tiny_causal_lm,
    encode_pair,
    load_causal_lm,
    load_tokenizer,
    pad_pairs,
    position_ids,
    response_logprobs,
    sequence_values,
    train_word_tokenizer,
)

CORPUS = ["review of the kettle :", "the kettle is very good .", "the kettle is not bad but slow ."]
ARCH = SimpleNamespace(n_layer=1, n_embd=16, n_head=2, n_positions=32, dropout=0.0)


def tiny(tmp_path):
    tokenizer = train_word_tokenizer(CORPUS)
    torch.manual_seed(0)
    model = build_tiny_causal_lm(tokenizer, ARCH)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    return load_tokenizer(tmp_path), load_causal_lm(tmp_path)


def rollouts_from(tokenizer, pairs) -> Rollouts:
    batch = pad_pairs([encode_pair(tokenizer, p, r, 32)[:2] for p, r in pairs], tokenizer.pad_token_id)
    p_len = max(len(tokenizer(p)["input_ids"]) for p, _ in pairs)
    zeros = torch.zeros(len(pairs))
    return Rollouts(
        prompt_ids=batch["input_ids"][:, :p_len],
        prompt_mask=batch["attention_mask"][:, :p_len],
        response_ids=batch["input_ids"][:, p_len:],
        response_mask=batch["response_mask"][:, p_len:],
        group=torch.arange(len(pairs)),
        logprobs=zeros,
        ref_logprobs=zeros,
        kl=zeros,
        scores=zeros,
        rewards=zeros,
    )


def test_word_tokenizer_round_trip_through_auto_tokenizer(tmp_path):
    tokenizer = train_word_tokenizer(CORPUS)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "the kettle is not very good ."
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "<eos>"
    assert loaded.decode([*ids, loaded.eos_token_id], skip_special_tokens=True) == text
    assert "<unk>" in loaded.decode(loaded("the toaster", add_special_tokens=False)["input_ids"])


def test_tiny_model_saves_as_safetensors_and_loads_with_auto_class(tmp_path):
    tiny(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    assert model.config.n_layer == 1 and model.config.n_embd == 16


def test_loaded_models_run_gelu_as_one_kernel_and_compute_what_gpt2s_gelu_new_does(tmp_path):
    """fuse_activations: no gelu_new module is left in a loaded causal LM or value model, and the
    logits, values and gradients match the model as transformers builds it within float32 rounding."""
    from transformers.activations import GELUTanh, NewGELUActivation

    tokenizer, fused = tiny(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)  # gelu_new as saved
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    value = ValueModel.from_causal_lm(tmp_path)
    for model in (fused, value):
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
        assert any(isinstance(m, GELUTanh) for m in model.modules())
    ids = torch.tensor([tokenizer("the kettle is very good .", add_special_tokens=False)["input_ids"]])
    # a direct tanh GELU, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), on a spread of inputs
    x = torch.linspace(-8, 8, 1001)
    direct = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(GELUTanh()(x), direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    fused(ids).logits.sum().backward()
    plain(ids).logits.sum().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_encode_pair_truncates_the_prompt_from_the_left(tmp_path):
    tokenizer = train_word_tokenizer(CORPUS)
    prompt_ids, response_ids, truncated = encode_pair(
        tokenizer, "review of the kettle :", "the kettle is good .", 8
    )
    assert truncated and len(prompt_ids) + len(response_ids) == 8
    assert response_ids[-1] == tokenizer.eos_token_id
    assert prompt_ids == tokenizer("the kettle :", add_special_tokens=False)["input_ids"][-len(prompt_ids) :]


def test_pad_pairs_aligns_responses_and_position_ids_skip_left_padding():
    batch = pad_pairs([([5, 6], [7, 1]), ([5], [7, 8, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 0], [0, 5, 7, 8, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert position_ids(batch["attention_mask"]).tolist() == [[0, 1, 2, 3, 3], [0, 0, 1, 2, 3]]


def test_response_logprobs_match_a_direct_per_sequence_computation(tmp_path):
    tokenizer, model = tiny(tmp_path)
    pairs = [("review of the kettle :", "the kettle is good ."), ("the kettle :", "good .")]
    rollouts = rollouts_from(tokenizer, pairs)
    logprobs, entropy = response_logprobs(model, rollouts)
    for b, (prompt, response) in enumerate(pairs):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        resp = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        # unpadded sequence: no masks, positions 0..n-1
        logits = model(torch.tensor([ids + resp])).logits[0]
        for t, token in enumerate(resp):
            expected = torch.log_softmax(logits[len(ids) + t - 1], -1)[token]
            torch.testing.assert_close(logprobs[b, t], expected, atol=1e-5, rtol=1e-5)
        assert torch.all(logprobs[b, len(resp) :] == 0) and torch.all(entropy[b, len(resp) :] == 0)


def test_value_model_poolings_and_save_load(tmp_path):
    tiny(tmp_path)
    torch.manual_seed(0)
    rm = ValueModel.from_causal_lm(tmp_path, pooling="last")
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    attention = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]])
    assert rm.pool(values, attention, response).tolist() == [3.0, 8.0]  # last non-pad position
    rm.pooling = "mean"
    assert rm.pool(values, attention, response).tolist() == [3.0, 7.5]  # mean over response tokens
    rm.pooling = "last"
    rm.save_pretrained(tmp_path / "rm", chosen_mean=0.5, chosen_std=2.0)
    loaded = ValueModel.from_pretrained(tmp_path / "rm")
    ids = torch.tensor([[3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(loaded.score(ids, mask), rm.score(ids, mask))
    assert loaded.metadata == {"chosen_mean": 0.5, "chosen_std": 2.0} and loaded.pooling == "last"


def test_policy_stack_trains_only_actor_and_critic(tmp_path):
    tokenizer, actor = tiny(tmp_path)
    reward = ValueModel.from_causal_lm(tmp_path)
    critic = ValueModel.from_causal_lm(tmp_path)
    stack = PolicyStack(actor, load_causal_lm(tmp_path), reward, critic)
    trainable = {id(p) for p in stack.parameters()}
    assert all(id(p) not in trainable for p in stack.reference.parameters())
    assert all(id(p) not in trainable for p in stack.reward.parameters())
    groups = stack.parameter_groups(1e-3, 5e-4)
    assert [g["name"] for g in groups] == ["actor", "critic"] and groups[1]["lr"] == 5e-4
    rollouts = rollouts_from(tokenizer, [("review of the kettle :", "the kettle is good .")])
    out = stack(rollouts, values=True)
    assert out.values.shape == out.logprobs.shape
    # identical weights: the reference agrees with the actor exactly (KL 0 at step 0)
    torch.testing.assert_close(stack.reference_logprobs(rollouts), out.logprobs.detach())


def test_sequence_value_averages_prompt_and_response_positions_and_skips_pads():
    """coati's critic value on hand-made per-position values: a loop over each row's valid tokens."""
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])  # left-padded
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])  # right-padded after EOS
    attention = torch.cat([prompt_mask, response_mask], dim=1)  # [B, P + T]
    values = torch.randn(attention.shape, generator=torch.Generator().manual_seed(0))
    values = torch.where(attention.bool(), values, torch.full_like(values, 1e4))  # pads must not count
    rollouts = Rollouts(
        prompt_ids=torch.zeros_like(prompt_mask),
        prompt_mask=prompt_mask,
        response_ids=torch.ones_like(response_mask),
        response_mask=response_mask,
        **{key: torch.zeros(3) for key in ("group", "logprobs", "ref_logprobs", "kl", "scores", "rewards")},
    )
    calls = []

    def critic(input_ids, attention_mask):  # a value model: [B, P + T] -> per-position values
        calls.append((input_ids, attention_mask))
        return values

    expected = []
    for b in range(3):
        valid = [values[b, c].item() for c in range(attention.shape[1]) if attention[b, c]]
        expected.append(sum(valid) / len(valid))
    torch.testing.assert_close(sequence_values(critic, rollouts), torch.tensor(expected))
    ((input_ids, mask),) = calls
    assert torch.equal(input_ids, rollouts.input_ids) and torch.equal(mask, attention)


def test_a_stack_reading_sequence_values_matches_each_unpadded_sequence(tmp_path):
    """Padding changes nothing: each row's value is the mean of the critic's values over its own
    unpadded tokens, prompt and response; the loss pass gives it with a gradient."""
    tokenizer, actor = tiny(tmp_path)
    torch.manual_seed(1)
    critic = ValueModel.from_causal_lm(tmp_path)
    stack = PolicyStack(
        actor, load_causal_lm(tmp_path), ValueModel.from_causal_lm(tmp_path), critic, values_per="sequence"
    )
    pairs = [("review of the kettle :", "the kettle is good ."), ("the kettle :", "good .")]
    rollouts = rollouts_from(tokenizer, pairs)
    out = stack(rollouts, values=True)
    assert out.values.shape == (2,) and out.values.requires_grad
    with torch.no_grad():
        for b, (prompt, response) in enumerate(pairs):
            ids = tokenizer(f"{prompt} {response}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[*ids, tokenizer.eos_token_id]])
            per_token = critic(ids, torch.ones_like(ids))[0]
            expected = sum(per_token[c].item() for c in range(ids.shape[1])) / ids.shape[1]
            assert out.values[b].item() == pytest.approx(expected, abs=1e-5)
        torch.testing.assert_close(stack.critic_values(rollouts), out.values.detach())
    with pytest.raises(ValueError, match="values_per='last'"):
        PolicyStack(actor, load_causal_lm(tmp_path), critic, critic, values_per="last")
