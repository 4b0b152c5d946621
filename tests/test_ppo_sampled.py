"""Single-step PPO with sampled baselines, checked against direct loop computations on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakePolicy
from omegaconf.errors import ValidationError

from algorithms.ppo_sampled import (
    Baseline,
    PPOSampled,
    PPOSampledConfig,
    group_mean_baseline,
    leave_one_out_baseline,
)
from backbone.batch import Rollouts
from backbone.sources import Online

# three prompts of three samples each, interleaved rather than contiguous
GROUP = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])
LENGTHS = [3, 5, 1, 4, 5, 2, 5, 3, 4]
T = 5


def make_rollouts(
    group: torch.Tensor = GROUP, lengths: list[int] = LENGTHS, kl_coef: float = 0.1, values: str | None = None
) -> Rollouts:
    """``values``: the critic's, per response token (``token``, [B, T]) or per sequence ([B])."""
    g = torch.Generator().manual_seed(0)
    b = len(group)
    shape = {"token": (b, T), "sequence": (b,)}
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])  # [B, T]
    kl = torch.rand(b, T, generator=g)  # garbage on pads too: only valid tokens may count
    return Rollouts(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.ones(b, T, dtype=torch.long),
        response_mask=mask,
        group=group,
        logprobs=-torch.rand(b, T, generator=g) - 0.5,
        ref_logprobs=-torch.rand(b, T, generator=g) - 0.5,
        kl=kl,
        scores=torch.randn(b, generator=g),
        rewards=torch.randn(b, generator=g),
        kl_coef=kl_coef,
        values=torch.randn(shape[values], generator=g) if values else None,
    )


def make_algo(**kwargs) -> PPOSampled:
    return PPOSampled(name="ppo_sampled", lr=1e-4, ppo_epochs=1, minibatch_size=8, **kwargs)


# --------------------------------------------------------------------------- references (loops)


def ref_seq_rewards(r: Rollouts) -> list[float]:
    out = []
    for i in range(len(r)):
        kl = sum(r.kl[i, t].item() for t in range(T) if r.response_mask[i, t])
        out.append(r.rewards[i].item() - r.kl_coef * kl)
    return out


def ref_group_mean(rewards: list[float], group: list[int]) -> list[float]:
    out = []
    for i in range(len(rewards)):
        members = [rewards[j] for j in range(len(rewards)) if group[j] == group[i]]
        out.append(sum(members) / len(members))
    return out


def ref_leave_one_out(rewards: list[float], group: list[int]) -> list[float]:
    out = []
    for i in range(len(rewards)):
        others = [rewards[j] for j in range(len(rewards)) if group[j] == group[i] and j != i]
        out.append(sum(others) / len(others))
    return out


def ref_baselines(baseline: str, r: Rollouts) -> list[float]:
    """b_i of each baseline: the group references, or the critic's value the baseline reads."""
    seq, group = ref_seq_rewards(r), r.group.tolist()
    if baseline == "sampled_mean":
        return ref_group_mean(seq, group)
    if baseline == "leave_one_out":
        return ref_leave_one_out(seq, group)
    if baseline == "critic":
        return [r.values[i, 0].item() for i in range(len(r))]  # V(prompt): the first response position
    return [r.values[i].item() for i in range(len(r))]  # critic_coati: one value per sequence


CRITIC_VALUES = {"critic": "token", "critic_coati": "sequence"}


def ref_policy_loss(lp, olp, adv: list[float], mask, eps: float) -> tuple[float, float]:
    """Masked mean over all valid tokens of max(-A rho, -A clip(rho)); and the clipped fraction."""
    total, clipped, n = 0.0, 0, 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            rho = math.exp(lp[i, t].item() - olp[i, t].item())
            unclipped, clip = -adv[i] * rho, -adv[i] * min(max(rho, 1 - eps), 1 + eps)
            total += max(unclipped, clip)
            clipped += clip > unclipped
            n += 1
    return total / n, clipped / n


# --------------------------------------------------------------------------- baselines


def test_group_mean_baseline_matches_loop_on_interleaved_groups():
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.7, -0.4, 0.9, 3.0, -2.2])
    expected = ref_group_mean(rewards.tolist(), GROUP.tolist())
    torch.testing.assert_close(group_mean_baseline(rewards, GROUP), torch.tensor(expected))


def test_leave_one_out_baseline_matches_loop_and_rloo_identity():
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.7, -0.4, 0.9, 3.0, -2.2])
    expected = ref_leave_one_out(rewards.tolist(), GROUP.tolist())
    loo = leave_one_out_baseline(rewards, GROUP)
    torch.testing.assert_close(loo, torch.tensor(expected))
    # R - b_loo = n / (n - 1) * (R - mean), n = 3
    torch.testing.assert_close(rewards - loo, 1.5 * (rewards - group_mean_baseline(rewards, GROUP)))


def test_group_baselines_handle_unequal_group_sizes():
    group = torch.tensor([5, 1, 5, 1, 1, 7, 7, 5, 1])  # sizes 3, 4, 2
    rewards = torch.arange(9, dtype=torch.float32) ** 1.5
    torch.testing.assert_close(
        group_mean_baseline(rewards, group), torch.tensor(ref_group_mean(rewards.tolist(), group.tolist()))
    )
    torch.testing.assert_close(
        leave_one_out_baseline(rewards, group),
        torch.tensor(ref_leave_one_out(rewards.tolist(), group.tolist())),
    )


def test_leave_one_out_rejects_a_singleton_group():
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("baseline", ["sampled_mean", "leave_one_out"])
def test_one_sample_per_prompt_is_a_clear_error(baseline: str):
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        make_algo(samples_per_prompt=1, baseline=baseline)


def test_the_schema_holds_the_defaults_once():
    algo = PPOSampled()  # every key from the schema
    assert algo.samples_per_prompt == PPOSampledConfig.samples_per_prompt == 4
    assert algo.baseline == "sampled_mean" and not algo.needs_critic
    assert algo.source == Online(4)
    assert algo.whiten_advantages is PPOSampledConfig.whiten_advantages


def test_constructor_validates_and_sets_critic_flag():
    with pytest.raises(ValidationError, match="expected one of"):
        make_algo(baseline="median")
    critic = make_algo(samples_per_prompt=1, baseline="critic")
    assert critic.needs_critic and critic.values_per == "token"
    coati = make_algo(samples_per_prompt=1, baseline="critic_coati")  # coati samples one per prompt
    assert coati.needs_critic and coati.values_per == "sequence"
    assert not make_algo(baseline="sampled_mean").needs_critic
    assert not make_algo(baseline="leave_one_out").needs_critic
    assert make_algo(samples_per_prompt=6).samples_per_prompt == 6


# --------------------------------------------------------------------------- prepare


def test_sequence_reward_counts_kl_on_valid_tokens_only():
    rollouts = make_rollouts(kl_coef=0.3)
    batch = make_algo().prepare(rollouts)
    torch.testing.assert_close(batch["seq_rewards"], torch.tensor(ref_seq_rewards(rollouts)))


@pytest.mark.parametrize(
    ("baseline", "reference"), [("sampled_mean", ref_group_mean), ("leave_one_out", ref_leave_one_out)]
)
def test_advantage_is_sequence_reward_minus_group_baseline(baseline, reference):
    rollouts = make_rollouts()
    batch = make_algo(baseline=baseline).prepare(rollouts)
    seq = ref_seq_rewards(rollouts)
    base = reference(seq, GROUP.tolist())
    torch.testing.assert_close(batch["baselines"], torch.tensor(base))
    torch.testing.assert_close(batch["advantages"], torch.tensor([s - b for s, b in zip(seq, base)]))
    assert batch["advantages"].shape == (len(rollouts),)  # one advantage per response


def test_whitening_is_optional_and_over_responses():
    rollouts = make_rollouts()
    raw = make_algo().prepare(rollouts)["advantages"]
    white = make_algo(whiten_advantages=True).prepare(rollouts)["advantages"]
    adv = raw.tolist()
    mean = sum(adv) / len(adv)
    std = math.sqrt(sum((a - mean) ** 2 for a in adv) / len(adv))
    torch.testing.assert_close(white, torch.tensor([(a - mean) / std for a in adv]))
    expected_raw = [
        s - b
        for s, b in zip(ref_seq_rewards(rollouts), ref_group_mean(ref_seq_rewards(rollouts), GROUP.tolist()))
    ]
    torch.testing.assert_close(raw, torch.tensor(expected_raw))


@pytest.mark.parametrize("baseline", ["critic", "critic_coati"])
def test_critic_baselines_read_the_prompt_value_or_the_sequence_value(baseline):
    rollouts = make_rollouts(values=CRITIC_VALUES[baseline])
    batch = make_algo(baseline=baseline).prepare(rollouts)
    base = ref_baselines(baseline, rollouts)
    torch.testing.assert_close(batch["baselines"], torch.tensor(base))
    seq = ref_seq_rewards(rollouts)
    torch.testing.assert_close(batch["advantages"], torch.tensor([s - b for s, b in zip(seq, base)]))


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("baseline", list(Baseline.__members__))
def test_every_baseline_logs_the_raw_advantage_std_of_the_whole_batch(baseline, whiten):
    """One metric for every arm: population std (and mean) of R - b over the batch, before whitening."""
    rollouts = make_rollouts(values=CRITIC_VALUES.get(baseline))
    batch = make_algo(baseline=baseline, whiten_advantages=whiten).prepare(rollouts)
    raw = [s - b for s, b in zip(ref_seq_rewards(rollouts), ref_baselines(baseline, rollouts))]
    mean = sum(raw) / len(raw)
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / len(raw))
    assert batch.stats.keys() == {"advantage_mean", "advantage_std"}
    assert batch.stats["advantage_mean"].item() == pytest.approx(mean, abs=1e-6)
    assert batch.stats["advantage_std"].item() == pytest.approx(std, rel=1e-5)
    assert batch.stats["advantage_std"].item() != pytest.approx(1.0, abs=1e-2)  # not the whitened std


# --------------------------------------------------------------------------- loss


def test_policy_loss_matches_loop_with_pads_and_clipped_ratios():
    rollouts = make_rollouts()
    algo = make_algo(cliprange=0.2)
    batch = algo.prepare(rollouts)
    g = torch.Generator().manual_seed(1)
    # ratios spread well beyond [0.8, 1.2]; pads hold wild values that must not count
    logprobs = rollouts.logprobs + 0.6 * torch.randn(rollouts.logprobs.shape, generator=g)
    logprobs = torch.where(rollouts.response_mask.bool(), logprobs, torch.full_like(logprobs, 50.0))
    policy = FakePolicy(logprobs)
    loss, stats = algo.loss(policy, batch)
    expected, clipfrac = ref_policy_loss(
        logprobs, rollouts.logprobs, batch["advantages"].tolist(), rollouts.response_mask, 0.2
    )
    assert 0 < clipfrac < 1  # the case exercises both branches
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["policy_loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["clipfrac"] == pytest.approx(clipfrac)
    assert policy.asked_values == [False]
    mask = rollouts.response_mask.float()
    assert stats["entropy"] == pytest.approx(((policy.entropy * mask).sum() / mask.sum()).item(), rel=1e-6)
    assert stats["baseline_mean"] == pytest.approx(batch["baselines"].mean().item())
    assert stats["sequence_reward_mean"] == pytest.approx(batch["seq_rewards"].mean().item())
    assert {"approx_kl", "clipfrac", "entropy"} <= stats.keys()
    assert "value_loss" not in stats
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())  # read once per update


def test_advantage_is_identical_over_the_tokens_of_a_response():
    """At rho = 1, dL/dlogp_{i,t} = -A_i / N on every valid token of i (N valid tokens), 0 on pads."""
    rollouts = make_rollouts()
    algo = make_algo()
    batch = algo.prepare(rollouts)
    policy = FakePolicy(rollouts.logprobs)
    loss, _ = algo.loss(policy, batch)
    loss.backward()
    n = sum(LENGTHS)
    for i, length in enumerate(LENGTHS):
        a = batch["advantages"][i].item()
        for t in range(T):
            expected = -a / n if t < length else 0.0
            assert policy.logprobs.grad[i, t].item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("baseline", ["critic", "critic_coati"])
def test_critic_value_loss_is_coatis_clipped_loss_where_the_baseline_reads(baseline):
    """L_vf = 0.5 mean_i max((V_i - R_i)^2, (clip(V_i, V_old_i +- c) - R_i)^2) on the one value per
    response the baseline reads: V(prompt) at the first response position, or coati's sequence value."""
    rollouts = make_rollouts(values=CRITIC_VALUES[baseline])
    algo = make_algo(baseline=baseline, cliprange_value=0.2, vf_coef=0.5)
    batch = algo.prepare(rollouts)
    g = torch.Generator().manual_seed(2)
    new_values = rollouts.values + 0.5 * torch.randn(rollouts.values.shape, generator=g)
    policy = FakePolicy(rollouts.logprobs, values=new_values)
    loss, stats = algo.loss(policy, batch)
    assert policy.asked_values == [True]

    def read(values, i):  # the value b_i is made of
        return values[i, 0].item() if baseline == "critic" else values[i].item()

    seq, n = ref_seq_rewards(rollouts), len(rollouts)
    terms, grads, clipped = [], [], 0
    for i in range(n):
        v, v_old = read(new_values, i), read(rollouts.values, i)
        v_clip = min(max(v, v_old - 0.2), v_old + 0.2)
        terms.append(max((v - seq[i]) ** 2, (v_clip - seq[i]) ** 2))
        is_clipped = (v_clip - seq[i]) ** 2 > (v - seq[i]) ** 2
        clipped += is_clipped
        grads.append(0.0 if is_clipped else 0.5 * (v - seq[i]) / n)  # d(vf_coef L_vf)/dV_i
    value_loss = 0.5 * sum(terms) / n
    assert 0 < clipped < len(rollouts)
    assert stats["value_loss"] == pytest.approx(value_loss, rel=1e-5)
    assert stats["value_clipfrac"] == pytest.approx(clipped / len(rollouts))
    # at rho = 1 the policy loss is -masked_mean(A)
    adv = batch["advantages"].tolist()
    policy_loss = -sum(adv[i] * n for i, n in enumerate(LENGTHS)) / sum(LENGTHS)
    assert loss.item() == pytest.approx(policy_loss + 0.5 * value_loss, rel=1e-5)

    loss.backward()
    grad = policy.values.grad
    if baseline == "critic":
        assert torch.all(grad[:, 1:] == 0)  # only V(prompt) is fitted
        grad = grad[:, 0]
    torch.testing.assert_close(grad, torch.tensor(grads))
