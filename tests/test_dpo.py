"""DPO's loss, implicit rewards, pairing and tie mask against direct loop computations on hand-made
tensors; its preference-pair source on a real (tiny) stack; its budget in a real run's record."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakePolicy, compose_config, read_history, read_summary, run_entry
from hydra.utils import instantiate
from omegaconf.errors import ValidationError
from test_rollout import ARCH, rollout_cfg
from test_run import SMALL

from algorithms.dpo import DPO, DPOConfig, check_pairs, pair_rows
from backbone.batch import Rollouts
from backbone.models import (
    PolicyStack,
    ValueModel,
    build_tiny_causal_lm,
    load_causal_lm,
    train_word_tokenizer,
)
from backbone.reward import RewardShaper
from backbone.rollout import RolloutCollector
from backbone.sources import Online, Preferences, build_source
from backbone.tasks.toy_reviews import ToyReviews
from backbone.validation import check_run_config

T = 5
# four pairs, their rows shuffled: neither the groups nor chosen-first order are contiguous
GROUP = torch.tensor([5, 2, 7, 2, 9, 7, 5, 9])
CHOSEN = torch.tensor([False, True, False, False, True, True, True, False])
LENGTHS = [3, 5, 1, 4, 5, 2, 5, 3]
# the reward model's scores; pair 7 (rows 2 and 5) is a tie
SCORES = torch.tensor([0.4, 1.0, -0.3, 0.2, 2.0, -0.3, 0.9, 1.1])


def mask_of(lengths: list[int]) -> torch.Tensor:  # [B, T]
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


def make_logprobs(seed: int) -> torch.Tensor:
    """Random log-probs on valid tokens, large garbage on pads (which must never count). [B, T]"""
    g = torch.Generator().manual_seed(seed)
    logprobs = -2 * torch.rand(len(LENGTHS), T, generator=g)
    return torch.where(mask_of(LENGTHS).bool(), logprobs, torch.full_like(logprobs, -100.0))


def make_rollouts(scores: torch.Tensor = SCORES) -> Rollouts:
    b = len(GROUP)
    return Rollouts(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.ones(b, T, dtype=torch.long),
        response_mask=mask_of(LENGTHS),
        group=GROUP,
        logprobs=make_logprobs(seed=1),
        ref_logprobs=make_logprobs(seed=2) * mask_of(LENGTHS),  # the collector's: 0 on pads
        kl=torch.zeros(b, T),
        scores=scores.clone(),
        rewards=scores.clone(),
        sampled=torch.ones(b, dtype=torch.bool),
        chosen=CHOSEN,
    )


def make_algo(**kwargs) -> DPO:
    return DPO(**{"lr": 1e-5, "minibatch_size": 4, **kwargs})


# --------------------------------------------------------------------------- references (loops)


def ref_pairs(group: list[int], chosen: list[bool]) -> dict[int, tuple[int, int]]:
    """group -> (chosen row, rejected row)."""
    rows: dict[int, dict[bool, int]] = {}
    for i, (g, c) in enumerate(zip(group, chosen)):
        rows.setdefault(g, {})[c] = i
    return {g: (r[True], r[False]) for g, r in rows.items()}


def ref_logp(logprobs: torch.Tensor, i: int) -> float:
    return sum(logprobs[i, t].item() for t in range(LENGTHS[i]))


def ref_dpo(logprobs, ref_logprobs, beta: float, eps: float = 0.0, skip: frozenset = frozenset()) -> dict:
    """Loss and statistics, per pair by the paper's formulas, averaged over the pairs not in ``skip``."""
    terms: dict[str, list[float]] = {}
    for g, (yw, yl) in ref_pairs(GROUP.tolist(), CHOSEN.tolist()).items():
        if g in skip:
            continue
        r_w = beta * (ref_logp(logprobs, yw) - ref_logp(ref_logprobs, yw))  # implicit rewards
        r_l = beta * (ref_logp(logprobs, yl) - ref_logp(ref_logprobs, yl))
        sigmoid = 1 / (1 + math.exp(-(r_w - r_l)))
        pair = {
            "loss": -(1 - eps) * math.log(sigmoid) - eps * math.log(1 - sigmoid),
            "rewards/chosen": r_w,
            "rewards/rejected": r_l,
            "rewards/margins": r_w - r_l,
            "rewards/accuracies": float(r_w > r_l),
            "logps/chosen": ref_logp(logprobs, yw),
            "logps/rejected": ref_logp(logprobs, yl),
        }
        for key, value in pair.items():
            terms.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in terms.items()}


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize(("beta", "label_smoothing"), [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_loss_and_implicit_rewards_match_the_loop(beta, label_smoothing):
    rollouts = make_rollouts()
    algo = make_algo(beta=beta, label_smoothing=label_smoothing)
    logprobs = make_logprobs(seed=3)
    loss, stats = algo.loss(FakePolicy(logprobs), algo.prepare(rollouts))
    expected = ref_dpo(logprobs, rollouts.ref_logprobs, beta, label_smoothing)
    assert loss.item() == pytest.approx(expected.pop("loss"), rel=1e-6)
    assert 0 < expected["rewards/accuracies"] < 1  # some pairs ordered each way
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, rel=1e-5), key
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())  # read once per update


def test_at_the_reference_the_loss_is_log_2_and_the_rewards_0():
    rollouts = make_rollouts()
    algo = make_algo()
    loss, stats = algo.loss(FakePolicy(rollouts.ref_logprobs), algo.prepare(rollouts))
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["rewards/margins"] == stats["rewards/chosen"] == stats["rewards/accuracies"] == 0


def test_pairs_are_found_by_group_and_chosen_in_any_row_order():
    chosen_rows, rejected_rows = pair_rows(GROUP, CHOSEN)
    expected = ref_pairs(GROUP.tolist(), CHOSEN.tolist())
    assert sorted(zip(chosen_rows.tolist(), rejected_rows.tolist())) == sorted(expected.values())
    # the loss does not depend on the order of the rows
    rollouts, logprobs = make_rollouts(), make_logprobs(seed=3)
    algo = make_algo()
    loss, stats = algo.loss(FakePolicy(logprobs), algo.prepare(rollouts))
    order = torch.randperm(len(GROUP), generator=torch.Generator().manual_seed(0))
    shuffled, shuffled_stats = algo.loss(FakePolicy(logprobs[order]), algo.prepare(rollouts.select(order)))
    assert shuffled.item() == pytest.approx(loss.item(), rel=1e-6)
    for key in stats.keys() - {"entropy"}:  # the fake policy's entropy is noise
        assert shuffled_stats[key].item() == pytest.approx(stats[key].item(), rel=1e-6)


def test_minibatches_keep_pairs_whole_and_average_over_their_own_pairs():
    """The trainer's shuffled minibatches (whole groups until 4 rows, two pairs): each one's loss is
    the mean over its own pairs, and their mean the whole batch's loss."""
    rollouts = make_rollouts()
    algo = make_algo(beta=0.5)
    logprobs = rollouts.logprobs  # the policy: the log-probs its rows were collected with
    seen, losses = [], []
    for minibatch in algo.prepare(rollouts).minibatches(4, torch.Generator().manual_seed(1)):
        groups = set(minibatch.rollouts.group.tolist())
        assert len(minibatch) == 4 and len(groups) == 2
        loss, _ = algo.loss(FakePolicy(minibatch.rollouts.logprobs), minibatch)
        others = frozenset(GROUP.tolist()) - groups
        assert loss.item() == pytest.approx(
            ref_dpo(logprobs, rollouts.ref_logprobs, 0.5, skip=others)["loss"]
        )
        seen += groups
        losses.append(loss.item())
    assert sorted(seen) == sorted(set(GROUP.tolist()))  # every pair once
    assert sum(losses) / len(losses) == pytest.approx(ref_dpo(logprobs, rollouts.ref_logprobs, 0.5)["loss"])


def test_gradient_reaches_the_valid_tokens_of_each_pair_and_never_a_pad():
    """dL/dlog pi(y_t) = -/+ beta * sigmoid(-beta h) / N on every valid token of y_w / y_l."""
    rollouts, logprobs = make_rollouts(), make_logprobs(seed=3)
    algo = make_algo(beta=0.5)
    policy = FakePolicy(logprobs)
    loss, _ = algo.loss(policy, algo.prepare(rollouts))
    loss.backward()
    pairs = ref_pairs(GROUP.tolist(), CHOSEN.tolist())
    for yw, yl in pairs.values():
        h = (ref_logp(logprobs, yw) - ref_logp(rollouts.ref_logprobs, yw)) - (
            ref_logp(logprobs, yl) - ref_logp(rollouts.ref_logprobs, yl)
        )
        slope = 0.5 / (1 + math.exp(0.5 * h)) / len(pairs)
        for row, sign in ((yw, -1), (yl, 1)):
            for t in range(T):
                expected = sign * slope if t < LENGTHS[row] else 0.0
                assert policy.logprobs.grad[row, t].item() == pytest.approx(expected, abs=1e-7)


# --------------------------------------------------------------------------- ties


def test_online_ties_are_masked_out_of_the_loss_and_counted():
    rollouts, logprobs = make_rollouts(), make_logprobs(seed=3)
    algo = make_algo(mode="online")
    batch = algo.prepare(rollouts)
    assert batch.stats["tie_fraction"].item() == pytest.approx(1 / 4)  # pair 7 of four
    policy = FakePolicy(logprobs)
    loss, stats = algo.loss(policy, batch)
    expected = ref_dpo(logprobs, rollouts.ref_logprobs, algo.beta, skip=frozenset({7}))
    assert loss.item() == pytest.approx(expected.pop("loss"), rel=1e-6)
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, rel=1e-5), key
    loss.backward()
    tied = (GROUP == 7).nonzero().flatten()
    assert torch.all(policy.logprobs.grad[tied] == 0) and policy.logprobs.grad.abs().sum() > 0


def test_offline_labels_are_the_datas_even_where_the_scores_tie():
    rollouts, logprobs = make_rollouts(), make_logprobs(seed=3)
    algo = make_algo(mode="offline")
    batch = algo.prepare(rollouts)
    assert "tie_fraction" not in batch.stats
    loss, _ = algo.loss(FakePolicy(logprobs), batch)
    assert loss.item() == pytest.approx(ref_dpo(logprobs, rollouts.ref_logprobs, algo.beta)["loss"], rel=1e-6)


def test_a_minibatch_of_ties_only_has_zero_loss_and_gradient():
    rollouts, logprobs = make_rollouts(scores=torch.zeros(len(GROUP))), make_logprobs(seed=3)
    algo = make_algo(mode="online")
    batch = algo.prepare(rollouts)
    assert batch.stats["tie_fraction"].item() == 1.0
    policy = FakePolicy(logprobs)
    loss, stats = algo.loss(policy, batch)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(policy.logprobs.grad == 0)
    assert all(torch.isfinite(v) for v in stats.values())


# --------------------------------------------------------------------------- pairs and config


@pytest.mark.parametrize(
    ("group", "chosen"),
    [
        ([0, 0, 1, 1], [True, True, False, True]),  # a pair of two chosen rows
        ([0, 0, 1, 1], [False, False, True, False]),  # ... of two rejected rows
        ([0, 0, 0, 1], [True, False, False, True]),  # a group of three, a group of one
        ([0, 0, 1], [True, False, True]),  # an odd number of rows
    ],
)
def test_anything_but_pairs_is_refused(group, chosen):
    with pytest.raises(ValueError, match="each group must be a chosen row and a rejected row"):
        check_pairs(torch.tensor(group), torch.tensor(chosen))


def test_rollouts_without_labels_are_refused():
    rollouts = make_rollouts()
    rollouts.chosen = None
    with pytest.raises(ValueError, match="mark no chosen rows"):
        make_algo().prepare(rollouts)


def test_the_schema_holds_the_defaults_once_and_the_mode_picks_the_source():
    algo = DPO()  # every key from the schema
    assert algo.beta == DPOConfig.beta == 0.3 and algo.label_smoothing == 0.0
    assert algo.mode == "offline" and algo.source == Preferences() and algo.source.unit == "pairs"
    online = DPO(mode="online")
    assert online.source == Online(2, label_pairs=True) and online.source.unit == "samples"
    assert not algo.needs_critic
    with pytest.raises(ValidationError, match="expected one of"):
        DPO(mode="batch")
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPO(beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        DPO(label_smoothing=0.5)


def run_problems(overrides: list[str]) -> list[str]:
    cfg = compose_config(["algorithm=dpo", *overrides])
    try:
        check_run_config(cfg, instantiate(cfg.algorithm))
    except ValueError as error:
        return str(error).split("\n  - ")[1:]
    return []


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_the_default_config_passes_in_either_mode(mode):
    assert run_problems([f"algorithm.mode={mode}", "reward.pooling=mean"]) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("kl.target=6", "kl.target=6.0: DPO's KL coefficient is algorithm.beta"),
        ("kl.coef=0.1", "kl.coef=0.1: DPO's KL coefficient is algorithm.beta"),
        ("kl.estimator=k3", "kl.estimator=k3: DPO's"),
        ("reward.normalize=running", "reward.normalize=running: DPO reads no shaped reward"),
        ("reward.missing_eos_penalty=1.0", "reward.missing_eos_penalty=1.0: DPO reads no shaped reward"),
    ],
)
def test_settings_dpo_never_reads_are_refused_by_name(override, message):
    assert [p for p in run_problems([override]) if p.startswith(message)]


def test_online_pairs_need_an_even_number_of_samples():
    problems = run_problems(["algorithm.mode=online", "rollout.samples_per_iteration=63"])
    assert any("not a multiple of algorithm.samples_per_prompt=2" in p for p in problems)
    assert run_problems(["rollout.samples_per_iteration=63"]) == []  # 63 pairs offline


# --------------------------------------------------------------------------- the source


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny random actor, a reference that differs from it, and a reward model (test_rollout's shape)."""
    path = tmp_path_factory.mktemp("tiny")
    task = ToyReviews(n_sft_train=50, n_sft_eval=10, n_pref_train=40, n_pref_eval=10, n_rl_prompts=20)
    tokenizer = train_word_tokenizer(task.corpus())
    torch.manual_seed(0)
    build_tiny_causal_lm(tokenizer, ARCH).save_pretrained(path)
    tokenizer.save_pretrained(path)
    reference = load_causal_lm(path)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    value = ValueModel.from_causal_lm(path)
    return task, tokenizer, PolicyStack(load_causal_lm(path), reference, value, value)


def test_preference_pairs_come_from_the_train_split_chosen_first_with_the_references_log_probs(stack):
    task, tokenizer, policy_stack = stack
    shaper = RewardShaper(normalize="running", clip=None, missing_eos_penalty=None)
    collector = RolloutCollector(
        policy_stack, tokenizer, task, shaper, "k1", rollout_cfg(max_new_tokens=24), 48, torch.device("cpu")
    )
    source = build_source(DPO().source, collector, task, units_per_iteration=6, seed=0, with_values=False)
    train = {(p["prompt"], p["chosen"], p["rejected"]) for p in task.preference_pairs("train")}
    seen = set()
    for iteration in (1, 2):
        rollouts = source.next(iteration, kl_coef=0.0)
        assert len(rollouts) == 12 and rollouts.group.tolist() == [g for g in range(6) for _ in range(2)]
        assert rollouts.chosen.tolist() == [True, False] * 6 and not rollouts.sampled.any()
        pairs = {
            (rollouts.prompts[i], rollouts.responses[i], rollouts.responses[i + 1]) for i in range(0, 12, 2)
        }
        assert pairs <= train and not pairs & seen  # the split's pairs, none twice in a pass
        seen |= pairs
        assert rollouts.prompts[::2] == rollouts.prompts[1::2]
        # computed once, here, by a forward pass of the reference: not the actor's
        torch.testing.assert_close(rollouts.ref_logprobs, policy_stack.reference_logprobs(rollouts))
        assert not torch.allclose(rollouts.ref_logprobs, rollouts.logprobs)
        check_pairs(rollouts.group, rollouts.chosen)
    assert source.unit == "pairs" and source.samples == source.tokens == 0  # nothing generated
    assert shaper.running.count == 0  # the data's responses are not the policy's reward statistics


# --------------------------------------------------------------------------- a run's record


@pytest.mark.parametrize(("mode", "unit"), [("offline", "pairs"), ("online", "samples")])
def test_the_budget_is_counted_in_pairs_offline_and_samples_online(mode, unit, artifacts_dir, tmp_path):
    run_dir = tmp_path / "run"
    small = [o for o in SMALL if not o.startswith("frontier.")]  # 8 units per iteration
    args = ["algorithm=dpo", f"algorithm.mode={mode}", *small, "iterations=2", "frontier.best_of_n=0"]
    run_entry([*args, f"paths.artifacts={artifacts_dir}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    summary = read_summary(run_dir)
    assert summary["budget_unit"] == unit and summary["budget"] == 16
    rows = [r for r in read_history(run_dir) if r.get("iteration", 0) > 0 and "train/loss" in r]
    assert [r["budget"] for r in rows] == [8, 16]
    assert all("train/rewards/margins" in r and "train/logps/chosen" in r for r in rows)
    assert all(k in summary for k in ("gain/eval/gold_mean", "gain/eval/kl_mean"))  # evaluation samples
    rollout_keys = {k for r in rows for k in r if k.startswith("rollout/")}
    if mode == "offline":
        assert summary["samples"] == summary["tokens"] == 0 and [r["samples"] for r in rows] == [0, 0]
        assert not rollout_keys and not any("train/tie_fraction" in r for r in rows)
    else:
        assert summary["samples"] == 16 and [r["samples"] for r in rows] == [8, 16]
        assert {"rollout/reward_mean", "rollout/kl_mean"} <= rollout_keys
        assert all(0 <= r["train/tie_fraction"] <= 1 for r in rows)
