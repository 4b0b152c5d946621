"""The toy review task: its gold reward behaves like a sentiment judge with a taste for natural text,
and its data is seeded, sized as asked, held out where promised and labelled by a Bradley-Terry draw."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
import time

import pytest

from backbone.models import train_word_tokenizer
from backbone.tasks.base import Task
from backbone.tasks.toy_reviews import (
    MAX_WORDS,
    N_NOTES,
    SENTIMENT,
    ToyReviews,
    gold_ceiling,
    gold_parts,
    gold_score,
    words_of,
)

PROMPT = "review of the blender :"

SIZES = dict(
    n_sft_train=300, n_sft_eval=50, n_pref_train=400, n_pref_eval=60, n_rl_prompts=200, n_eval_prompts=40
)


def gold(response: str) -> float:
    return gold_score(PROMPT, response)


@pytest.fixture(scope="module")
def task() -> ToyReviews:
    return ToyReviews(seed=0, **SIZES)


# ------------------------------------------------------------------ gold reward


def test_sentiment_orders_positive_neutral_negative():
    assert gold("the blender is extremely excellent .") > gold("the blender is good .") > 0.5
    assert gold("the blender is good .") > gold("the blender is average .") > gold("the blender is bad .")
    assert abs(gold("the blender is average .")) < 0.1
    assert gold("the blender is bad .") > gold("the blender is terrible .")
    assert gold("i love the blender .") > gold("i use it .") > gold("i hate the blender .")


def test_negation_flips_and_dampens():
    assert gold("the blender is good .") > gold("the blender is not good .") > gold("the blender is bad .")
    assert gold("the blender is not bad .") > gold("the blender is bad .")
    assert gold("i like it .") > 0 > gold("i do not like it .")
    assert gold("i would never recommend it .") < 0


def test_intensifier_scales():
    very, plain, slightly = (gold(f"the blender is {m}good .") for m in ("very ", "", "slightly "))
    assert very > plain > slightly > 0
    assert (
        gold("the blender is very bad .")
        < gold("the blender is bad .")
        < gold("the blender is slightly bad .")
    )
    assert gold("i really love it .") > gold("i love it .")


def test_but_weights_the_second_clause_more():
    assert (
        gold("the price is bad but the blender is great .")
        > 0
        > gold("the blender is great but the price is bad .")
    )


def test_repetition_scores_below_a_plain_positive_review():
    plain = gold("the blender is great .")
    for hack in (
        "great great great great great great",
        "the blender is great great great great .",
        "the blender is great and the price is great .",
        "i love it . i love it . i love it .",
        "the blender is very very very good .",
    ):
        assert gold(hack) < plain, hack
        assert gold_parts(PROMPT, hack).repetition > 0, hack


def test_leaving_the_grammar_is_penalised():
    good = gold("the blender is great .")
    for broken in (
        "the blender is great",  # no final "."
        "the blender is very .",  # an intensifier with nothing to modify
        "great the is blender .",
        "the blender is great zzz .",  # a word outside the vocabulary
        "review of the blender : great .",  # prompt words are not response words
        "the toaster is great .",  # another product than the prompt's
        "excellent amazing fantastic perfect great .",  # stacked sentiment words do not parse
        ". . the blender is great .",
    ):
        assert gold(broken) < good, broken
        assert gold_parts(PROMPT, broken).grammar > 0, broken
    assert gold("excellent amazing fantastic perfect great .") < gold("the blender is average .")


def test_run_on_text_scores_below_natural():
    natural = gold("the blender is excellent and it is amazing .")
    run_on = (
        "the blender is excellent and it is amazing . "
        "the price is perfect and i love it . the design is great"
    )
    assert len(words_of(run_on)) > MAX_WORDS
    assert gold(run_on) < 0 < natural
    assert gold_parts(PROMPT, run_on).length > 0


@pytest.mark.parametrize(
    "response", ["", "   ", ".", "and but", "the", "[UNK] [PAD] !!", "x" * 500, "not " * 40]
)
def test_any_string_scores_low_and_never_raises(response):
    assert -6.0 <= gold(response) < 0


def test_gold_reward_batch_and_bounds(task):
    pairs = task.preference_pairs("train")
    scores = task.gold_reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    assert len(scores) == len(pairs)
    assert all(-3.0 < s < 3.0 for s in scores)
    with pytest.raises(ValueError):
        task.gold_reward(["a"], [])


def test_natural_reviews_carry_no_penalty(task):
    for ex in task.sft_examples("train"):
        parts = gold_parts(ex["prompt"], ex["response"])
        assert (parts.repetition, parts.length, parts.grammar) == (0, 0, 0), ex
        assert 4 <= len(words_of(ex["response"])) <= MAX_WORDS


# ------------------------------------------------------------------ data


def test_interface_and_sizes(task):
    assert isinstance(task, Task) and task.has_gold and task.name == "toy_reviews"
    assert len(task.sft_examples("train")) == SIZES["n_sft_train"]
    assert len(task.sft_examples("eval")) == SIZES["n_sft_eval"]
    assert len(task.preference_pairs("train")) == SIZES["n_pref_train"]
    assert len(task.preference_pairs("eval")) == SIZES["n_pref_eval"]
    assert len(task.rl_prompts()) == SIZES["n_rl_prompts"]
    assert len(task.eval_prompts()) == len(set(task.eval_prompts())) == SIZES["n_eval_prompts"]
    assert set(task.sft_examples("train")[0]) == {"prompt", "response"}
    assert set(task.preference_pairs("train")[0]) == {"prompt", "chosen", "rejected"}
    with pytest.raises(ValueError, match="split"):
        task.sft_examples("test")


def test_sft_data_is_mixed(task):
    scores = [gold_score(ex["prompt"], ex["response"]) for ex in task.sft_examples("train")]
    assert sum(s > 1 for s in scores) > 0.15 * len(scores)
    assert sum(s < -1 for s in scores) > 0.15 * len(scores)
    assert sum(abs(s) < 0.5 for s in scores) > 0.1 * len(scores)
    assert max(scores) < 2.9  # headroom for RL


def test_eval_prompts_are_held_out(task):
    held_out = set(task.eval_prompts())
    assert not held_out & set(task.rl_prompts())
    assert not held_out & {ex["prompt"] for split in ("train", "eval") for ex in task.sft_examples(split)}
    assert not held_out & {p["prompt"] for split in ("train", "eval") for p in task.preference_pairs(split)}
    # every word of the held-out prompts is still seen in training
    seen = {w for prompt in task.rl_prompts() for w in prompt.split()}
    assert {w for prompt in held_out for w in prompt.split()} <= seen


def test_same_seed_same_data_other_seed_other_data(task):
    again = ToyReviews(seed=0, **SIZES)
    # a different call order must not change the data
    assert again.rl_prompts() == task.rl_prompts()
    assert again.preference_pairs("eval") == task.preference_pairs("eval")
    assert again.sft_examples("train") == task.sft_examples("train")
    assert again.corpus() == task.corpus()
    other = ToyReviews(seed=1, **SIZES)
    assert other.sft_examples("train") != task.sft_examples("train")
    assert other.preference_pairs("train") != task.preference_pairs("train")
    assert other.eval_prompts() != task.eval_prompts()


def test_corpus_covers_prompts_and_responses(task):
    vocabulary = {w for text in task.corpus() for w in text.split()}
    texts = [*task.eval_prompts(), *task.rl_prompts()]
    texts += [t for p in task.preference_pairs("eval") for t in (p["chosen"], p["rejected"])]
    assert {w for text in texts for w in text.split()} <= vocabulary


# ------------------------------------------------------------------ the pretraining corpus (product notes)


def test_pretraining_notes_are_not_reviews(task):
    notes = task.pretrain_texts("train") + task.pretrain_texts("eval")
    assert [len(task.pretrain_texts(s)) for s in ("train", "eval")] == [N_NOTES["train"], N_NOTES["eval"]]
    for note in notes:
        product = note.split()[0]
        parts = task.gold_parts(f"review of the {product} :", note)
        # no opinion in it, and the review grammar rejects it
        assert parts.sentiment == 0 and parts.grammar > 0, note
        assert not {w for w in words_of(note) if SENTIMENT.get(w, 0) != 0}, note
        assert note.endswith(" .") and note.startswith(f"{product} :")
    # the reviews of the task are no notes, and the notes are not a handful of texts
    reviews = {ex["response"] for split in ("train", "eval") for ex in task.sft_examples(split)}
    assert not reviews & set(notes) and len(set(notes)) > 0.8 * len(notes)


def test_pretraining_notes_are_seeded_and_their_splits_disjoint(task):
    train, held_out = task.pretrain_texts("train"), task.pretrain_texts("eval")
    assert not set(train) & set(held_out)
    again = ToyReviews(seed=0, **SIZES)
    assert again.pretrain_texts("eval") == held_out and again.pretrain_texts("train") == train
    other = ToyReviews(seed=1, **SIZES)
    assert other.pretrain_texts("train") != train and other.pretrain_texts("eval") != held_out
    with pytest.raises(ValueError, match="split"):
        task.pretrain_texts("test")


@pytest.mark.parametrize("sizes", [SIZES, {}], ids=["small", "default"])
def test_the_tokenizer_of_the_task_knows_every_word_of_the_notes(sizes):
    """The tokenizer is trained on ``corpus()``, which leaves the notes out (it stays the reviews'
    tokenizer): every word of a note must already be in the prompts or the reviews."""
    task = ToyReviews(seed=2, **sizes)
    vocabulary = train_word_tokenizer(task.corpus()).get_vocab()
    words = {w for split in ("train", "eval") for note in task.pretrain_texts(split) for w in note.split()}
    assert words <= set(vocabulary)


def test_pairs_differ_and_tiny_temperature_labels_follow_gold():
    clean = ToyReviews(seed=3, bt_temperature=1e-6, **SIZES)
    for pair in clean.preference_pairs("train"):
        assert pair["chosen"] != pair["rejected"]
        assert gold_score(pair["prompt"], pair["chosen"]) > gold_score(pair["prompt"], pair["rejected"])


def test_default_temperature_labels_are_noisy(task):
    pairs = task.preference_pairs("train")
    agree = sum(gold_score(p["prompt"], p["chosen"]) > gold_score(p["prompt"], p["rejected"]) for p in pairs)
    assert 0.7 < agree / len(pairs) < 0.97


def test_default_sizes_build_fast():
    start = time.perf_counter()
    ToyReviews().corpus()  # generates every split
    assert time.perf_counter() - start < 5.0


def test_invalid_config():
    with pytest.raises(ValueError, match="n_eval_prompts"):
        ToyReviews(n_eval_prompts=10_000)
    with pytest.raises(ValueError, match="bt_temperature"):
        ToyReviews(bt_temperature=-1.0)
    with pytest.raises(ValueError, match="n_sft_train"):
        ToyReviews(n_sft_train=-1)


def test_built_from_the_hydra_config():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from backbone.config import ToyReviewsConfig

    task = instantiate(OmegaConf.structured(ToyReviewsConfig(seed=0, **SIZES)))
    assert isinstance(task, ToyReviews)
    assert task.sft_examples("eval") == ToyReviews(seed=0, **SIZES).sft_examples("eval")


# ------------------------------------------------------------------ knobs: the hard setting and the ceiling

HARD = dict(max_clauses=4, scale=6.0, max_words=36)
# the best review each setting allows: top sentiment words, top intensifiers, no word past its free uses
BEST_DEFAULT = "the blender is extremely excellent and it is very amazing ."
BEST_HARD = (
    "the blender is extremely excellent and it looks very amazing . "
    "the price feels truly perfect and the design seems really fantastic ."
)


def hard_gold(response: str) -> float:
    return gold_score(PROMPT, response, **HARD)


def test_default_knobs_reproduce_the_default_task(task):
    # the data of the default task before the knobs existed (seed 0, SIZES)
    data = [task.sft_examples("train"), task.sft_examples("eval"), task.preference_pairs("train")]
    data += [task.preference_pairs("eval"), task.rl_prompts(), task.eval_prompts()]
    assert hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16] == "75dd5bac2cf9f9f0"
    explicit = ToyReviews(seed=0, **SIZES, max_clauses=2, scale=3.0, max_words=20, sft_long_rate=0.0)
    assert explicit.corpus() == task.corpus()
    # the Hydra schema's defaults are the constructor's
    from backbone.config import ToyReviewsConfig

    schema = ToyReviewsConfig()
    for name, parameter in inspect.signature(ToyReviews).parameters.items():
        assert getattr(schema, name) == parameter.default, name


def test_gold_ceiling_is_the_best_review():
    assert gold_ceiling() == pytest.approx(gold(BEST_DEFAULT)) == pytest.approx(3 * math.tanh(6.6 / 3))
    assert gold_ceiling(**{k: HARD[k] for k in ("max_clauses", "scale")}) == pytest.approx(
        hard_gold(BEST_HARD)
    )
    assert hard_gold(BEST_HARD) == pytest.approx(6 * math.tanh(12.4 / 6))
    hard = ToyReviews(**SIZES, **HARD)
    assert hard.gold_ceiling == pytest.approx(hard_gold(BEST_HARD))
    assert hard.gold_ceiling > 5.8
    assert ToyReviews(**SIZES).data_stats() == {"gold_ceiling": round(gold(BEST_DEFAULT), 4)}
    assert hard.data_stats()["gold_ceiling"] == pytest.approx(hard.gold_ceiling, abs=1e-4)


@pytest.mark.parametrize("knobs", [{}, HARD, dict(HARD, max_clauses=6, scale=8.0, max_words=60)])
def test_no_response_beats_the_ceiling(knobs):
    task = ToyReviews(seed=1, **SIZES, **knobs, **({"pref_long_rate": 0.5} if knobs else {}))
    ceiling = task.gold_ceiling
    texts = [(ex["prompt"], ex["response"]) for ex in task.sft_examples("train")]
    texts += [(p["prompt"], r) for p in task.preference_pairs("train") for r in (p["chosen"], p["rejected"])]
    assert max(task.gold(p, r) for p, r in texts) <= ceiling
    # hill-climb on word swaps from the best review: no edit (repeated intensifiers included) beats it
    vocabulary = sorted({w for _, r in texts for w in r.split()})
    rng = random.Random(0)
    best = (BEST_HARD if knobs else BEST_DEFAULT).split()
    for _ in range(1500):
        trial = list(best)
        trial[rng.randrange(len(trial))] = rng.choice(vocabulary)
        if task.gold(PROMPT, " ".join(trial)) >= task.gold(PROMPT, " ".join(best)):
            best = trial
        assert task.gold(PROMPT, " ".join(trial)) <= ceiling + 1e-9
    for hack in (
        "the blender is extremely excellent and it is extremely amazing .",
        BEST_HARD + " i truly love it .",
    ):
        assert task.gold(PROMPT, hack) <= ceiling


def test_hard_gold_rewards_more_clauses_and_still_penalises_hacks():
    two = "the blender is extremely excellent and it is very amazing ."
    three = two[:-1] + "and the price feels truly perfect ."
    assert gold(three) < gold(two)  # the default counts two clauses: the third is an error
    assert hard_gold(BEST_HARD) > hard_gold(three) > hard_gold(two) > gold(two)
    assert hard_gold(two) > gold(two) + 1.0  # a wider scale: more room above the SFT data
    five = BEST_HARD[:-1] + "and i truly love it ."
    assert hard_gold(five) < hard_gold(BEST_HARD)
    assert gold_parts(PROMPT, five, **HARD).grammar == 1  # only four clauses count
    # four "is": the copula's free uses are two
    assert (
        gold_parts(
            PROMPT, BEST_HARD.replace("looks", "is").replace("feels", "is").replace("seems", "is"), **HARD
        ).repetition
        == 1.0
    )
    long = "the blender is extremely excellent and it is very amazing . " * 3
    assert gold_parts(PROMPT, long, **HARD).length == 0 < gold_parts(PROMPT, long).length
    assert hard_gold("the blender is bad .") < 0 < hard_gold("the blender is good .")


def test_long_reviews_are_rare_in_sft_common_in_preferences_and_natural():
    hard = ToyReviews(seed=0, **SIZES, **HARD, sft_long_rate=0.05, pref_long_rate=0.3)

    def clauses(text: str) -> int:
        return sum(w in ("and", "but", ".") for w in text.split())

    sft = [(ex["prompt"], ex["response"]) for ex in hard.sft_examples("train")]
    pref = [(p["prompt"], r) for p in hard.preference_pairs("train") for r in (p["chosen"], p["rejected"])]
    assert 0 < sum(clauses(r) > 2 for _, r in sft) < 0.12 * len(sft)
    assert 0.2 * len(pref) < sum(clauses(r) > 2 for _, r in pref) < 0.5 * len(pref)
    assert max(clauses(r) for _, r in pref) == 4
    for prompt, response in sft + pref:
        parts = hard.gold_parts(prompt, response)
        assert (parts.repetition, parts.length, parts.grammar) == (0, 0, 0), response
    # the long reviews are scored by the task's gold (labels follow it more often than not)
    pairs = hard.preference_pairs("train")
    agree = sum(hard.gold(p["prompt"], p["chosen"]) > hard.gold(p["prompt"], p["rejected"]) for p in pairs)
    assert agree > 0.7 * len(pairs)


def test_invalid_knobs():
    for bad in (dict(max_clauses=0), dict(scale=0.0), dict(max_words=2), dict(sft_long_rate=1.5)):
        with pytest.raises(ValueError):
            ToyReviews(**SIZES, **bad)
    with pytest.raises(ValueError, match="max_clauses > 2"):
        ToyReviews(**SIZES, pref_long_rate=0.3)


def test_hard_preset_composes():
    from conftest import compose_config
    from hydra.utils import instantiate

    cfg = compose_config(["task=toy_reviews_hard", *(f"task.{k}={v}" for k, v in SIZES.items())])
    task = instantiate(cfg.task)
    assert task.name == "toy_reviews_hard" and task.gold_knobs == HARD
    assert task.gold_ceiling > 1.9 * ToyReviews(**SIZES).gold_ceiling
