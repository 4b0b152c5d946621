"""Rollouts from a real (tiny, random) policy stack: masks, log-probs, first ratio, KL at step 0."""

from types import SimpleNamespace

import pytest
import torch
from test_ppo_gae import make_algorithm

from backbone.models import (
    PolicyStack,
    ValueModel,
    build_tiny_causal_lm,
    load_causal_lm,
    train_word_tokenizer,
)
from backbone.reward import RewardShaper
from backbone.rollout import RolloutCollector, response_mask_upto_eos
from backbone.tasks.toy_reviews import ToyReviews

ARCH = SimpleNamespace(n_layer=1, n_embd=32, n_head=2, n_positions=48, dropout=0.0)


def rollout_cfg(**overrides):
    cfg = dict(max_new_tokens=10, min_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0, logprobs="generate")
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    task = ToyReviews(n_sft_train=200, n_sft_eval=10, n_pref_train=2000, n_pref_eval=10, n_rl_prompts=50)
    tokenizer = train_word_tokenizer(task.corpus())
    torch.manual_seed(0)
    build_tiny_causal_lm(tokenizer, ARCH).save_pretrained(path)
    tokenizer.save_pretrained(path)
    stack = PolicyStack(
        load_causal_lm(path),
        load_causal_lm(path),
        ValueModel.from_causal_lm(path),
        ValueModel.from_causal_lm(path),
    )
    return task, tokenizer, stack


def collector(setup, **overrides):
    task, tokenizer, stack = setup
    shaper = RewardShaper(normalize="none", clip=None, missing_eos_penalty=None)
    return RolloutCollector(
        stack, tokenizer, task, shaper, "k1", rollout_cfg(**overrides), 48, torch.device("cpu")
    )


def test_response_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, ended = response_mask_upto_eos(ids, eos_id=1)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_rollouts_are_masked_grouped_and_scored(setup):
    torch.manual_seed(0)
    prompts = setup[0].rl_prompts()[:6]
    rollouts = collector(setup).collect(prompts, samples_per_prompt=3, with_values=True)
    eos, pad = setup[1].eos_token_id, setup[1].pad_token_id
    assert len(rollouts) == 18 and rollouts.group.tolist() == [g for g in range(6) for _ in range(3)]
    assert rollouts.prompts[:3] == [prompts[0]] * 3
    for ids, mask in zip(rollouts.response_ids, rollouts.response_mask):
        n = int(mask.sum())
        assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)  # a prefix of the row
        assert eos not in ids[: n - 1].tolist()  # EOS only as the last counted token
        assert torch.all(ids[n:] == pad)  # nothing after the end counts or is kept
    for field in (rollouts.logprobs, rollouts.ref_logprobs, rollouts.kl, rollouts.values):
        assert torch.all(field[rollouts.response_mask == 0] == 0)
    assert rollouts.scores.shape == rollouts.gold.shape == (18,)
    assert rollouts.responses[0] == setup[1].decode(rollouts.response_ids[0], skip_special_tokens=True)


@pytest.mark.parametrize("logprobs", ["forward", "generate"])
def test_step_zero_kl_is_zero_and_the_first_ppo_ratio_is_one(setup, logprobs):
    """Exactly with the loss's own pass; within float rounding with generation's logits."""
    torch.manual_seed(1)
    rollouts = collector(setup, logprobs=logprobs).collect(setup[0].rl_prompts()[:8], with_values=True)
    exact = logprobs == "forward"
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 0, "atol": 1e-5}
    torch.testing.assert_close(rollouts.logprobs, rollouts.ref_logprobs, **tolerance)  # actor == reference
    torch.testing.assert_close(rollouts.kl, torch.zeros_like(rollouts.kl), **tolerance)
    torch.testing.assert_close(rollouts.kl_exact, torch.zeros_like(rollouts.kl_exact), **tolerance)
    algorithm = make_algorithm(lr=1e-3, ppo_epochs=1, minibatch_size=4)
    batch = algorithm.prepare(rollouts)
    for minibatch in batch.minibatches(4, torch.Generator().manual_seed(0)):
        _, stats = algorithm.loss(setup[2], minibatch)  # recomputed in smaller batches
        assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)


def test_min_new_tokens_and_greedy_decoding(setup):
    torch.manual_seed(2)
    rollouts = collector(setup, min_new_tokens=6).collect(setup[0].rl_prompts()[:8])
    assert int(rollouts.response_lengths.min()) >= 6
    prompts = setup[0].eval_prompts()[:4]
    greedy = collector(setup)
    first = greedy.collect(prompts, greedy=True)
    torch.manual_seed(99)
    assert torch.equal(greedy.collect(prompts, greedy=True).response_ids, first.response_ids)


def test_top_k_one_sampling_is_greedy(setup):
    prompts = setup[0].eval_prompts()[:4]
    greedy = collector(setup).collect(prompts, greedy=True)
    torch.manual_seed(3)
    top1 = collector(setup, top_k=1).collect(prompts)
    assert torch.equal(top1.response_ids, greedy.response_ids)


def test_given_responses_join_their_prompts_group_teacher_forced(setup):
    task, tokenizer, _ = setup
    prompts = task.rl_prompts()[:3]
    given = [task.chosen_response(p) for p in prompts]
    assert all(given) and task.chosen_response(task.eval_prompts()[0]) is None
    torch.manual_seed(4)
    rollouts = collector(setup, max_new_tokens=24).collect(
        prompts, samples_per_prompt=2, given_responses=given
    )
    assert len(rollouts) == 3 * 2 + 3
    assert rollouts.sampled.tolist() == [True] * 6 + [False] * 3
    assert rollouts.group.tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert rollouts.prompts[6:] == prompts and rollouts.responses[6:] == given
    last = rollouts.response_lengths[6:] - 1
    assert (
        rollouts.response_ids[6:].gather(1, last[:, None]).flatten().tolist() == [tokenizer.eos_token_id] * 3
    )
    assert torch.all(rollouts.logprobs[rollouts.response_mask == 0] == 0)


def test_long_prompts_keep_their_end_and_are_counted(setup):
    # max_length 48 - 44 new tokens leaves 4 prompt tokens
    c = collector(setup, max_new_tokens=44)
    _, tokenizer, _ = setup
    prompts = ["Review of the blender :", "Review :"]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths[0] > 4 >= lengths[1]
    assert c.count_truncated(prompts) == 1
    ids, mask = c.encode_prompts(prompts, 1)
    full = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == full[-4:] and mask[0].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 5, "min_new_tokens": 4}])
def test_logprobs_from_generation_match_a_separate_forward_pass(setup, sampling):
    """The logits generation computed (raw: before temperature, top-k and the EOS ban) give the
    loss's log-probs up to float rounding; rows taken from the data go through a forward pass."""
    task, _, stack = setup
    prompts = task.rl_prompts()[:4]
    given = [task.chosen_response(p) for p in prompts]
    torch.manual_seed(5)
    rollouts = collector(setup, max_new_tokens=24, **sampling).collect(
        prompts, samples_per_prompt=3, given_responses=given
    )
    torch.testing.assert_close(rollouts.logprobs, stack.old_logprobs(rollouts), rtol=0, atol=1e-5)
    torch.manual_seed(5)
    forward = collector(setup, max_new_tokens=24, logprobs="forward", **sampling).collect(
        prompts, samples_per_prompt=3, given_responses=given
    )
    assert torch.equal(forward.response_ids, rollouts.response_ids)  # the same samples either way
    assert torch.equal(forward.logprobs, stack.old_logprobs(forward))


def test_exact_kl_is_the_sum_over_the_vocabulary_of_each_position(setup):
    """Against a brute-force computation: per sequence, per position, a loop over the vocabulary of
    the two models' next-token distributions, from unbatched forward passes of the unpadded text."""
    task, tokenizer, stack = setup
    torch.manual_seed(6)
    other = load_causal_lm(stack.actor.config._name_or_path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs from the actor
    shifted = PolicyStack(stack.actor, other, stack.reward)
    c = RolloutCollector(
        shifted,
        tokenizer,
        task,
        RewardShaper(normalize="none", clip=None, missing_eos_penalty=None),
        "k1",
        rollout_cfg(),
        48,
        torch.device("cpu"),
    )
    rollouts = c.collect(task.rl_prompts()[:3], samples_per_prompt=2)
    assert torch.all(rollouts.kl_exact[rollouts.response_mask == 0] == 0)
    for i in range(len(rollouts)):
        prompt = rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()]
        n = int(rollouts.response_mask[i].sum())
        ids = torch.cat([prompt, rollouts.response_ids[i, :n]])[None]
        with torch.no_grad():
            p = torch.softmax(stack.actor(ids).logits[0].double(), -1)
            q = torch.softmax(other(ids).logits[0].double(), -1)
        for t in range(n):
            pos = len(prompt) - 1 + t  # the position whose logits predict response token t
            kl = sum(float(p[pos, v] * (p[pos, v].log() - q[pos, v].log())) for v in range(p.shape[1]))
            assert float(rollouts.kl_exact[i, t]) == pytest.approx(kl, abs=1e-5)
    assert float(rollouts.kl_exact.sum()) > 0
