"""Real model families through the real loading code, with nothing downloaded.

Each family (GPT-2, GPT-NeoX as in Pythia, OPT, LLaMA) is a tiny random model built from its
transformers config class and saved with ``save_pretrained`` (safetensors), beside a byte-level
BPE tokenizer trained here with the real tokenizer's special tokens: like the real ones, only
OPT's has a pad token. ``model.name_or_path`` points at the folder exactly as it would name a hub
id, so loading, padding, the SFT and reward-model stages and rollouts run as they would on the
real checkpoints; one end-to-end run trains the GPT-2 family on a local hh-rlhf-schema dataset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    CONF,
    assert_checkpointed_loss_pass_matches,
    compose_config,
    read_history,
    read_summary,
    run_entry,
    write_jsonl,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from backbone.batch import Rollouts
from backbone.models import (
    PolicyStack,
    ValueModel,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    pad_pairs,
    position_ids,
)
from backbone.reward import RewardShaper
from backbone.roles import build_policy_stack
from backbone.rollout import RolloutCollector
from backbone.stages import prepare_stages, stage_rows_to

H, A = "\n\nHuman: ", "\n\nAssistant:"
EOT = "<|endoftext|>"
POSITIONS = 128
# family -> (config class, architecture kwargs, the real tokenizer's special tokens)
FAMILIES = {
    "gpt2": (GPT2Config, {"n_layer": 2, "n_embd": 32, "n_head": 2}, {"bos_token": EOT, "eos_token": EOT}),
    "gpt_neox": (
        GPTNeoXConfig,
        {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
        {"bos_token": EOT, "eos_token": EOT},
    ),
    "opt": (
        OPTConfig,
        # word_embed_proj_dim < hidden_size, as in OPT-350m: the last hidden state is projected down
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "word_embed_proj_dim": 16,
            "ffn_dim": 64,
            "num_attention_heads": 2,
        },
        {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>"},
    ),
    "llama": (
        LlamaConfig,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
        },
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    ),
}
# conf/model option -> the family its checkpoint belongs to
MODEL_OPTIONS = {
    "gpt2": "gpt2",
    "pythia-160m": "gpt_neox",
    "pythia-1b": "gpt_neox",
    "opt-350m": "opt",
    "opt-1.3b": "opt",
    "llama-7b": "llama",
}


def hh_row(i: int) -> dict:
    dialogue = f"{H}hi there {i}{A} hello, how can I help?{H}is the lamp {i} good?{A}"
    return {"chosen": f"{dialogue} yes, it is bright.", "rejected": f"{dialogue} no idea, go away."}


CORPUS = [text for i in range(20) for text in hh_row(i).values()]


def bpe_tokenizer(special_tokens: dict[str, str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(dict.fromkeys(special_tokens.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> a folder with a tiny random model of it and its tokenizer, read as a hub id would be."""
    folders = {}
    for family, (config_class, arch, special_tokens) in FAMILIES.items():
        tokenizer = bpe_tokenizer(special_tokens)
        ids = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
        config = config_class(vocab_size=len(tokenizer), max_position_embeddings=POSITIONS, **arch, **ids)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    return folders


# --------------------------------------------------------------------------- loading each family


def left_padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as prompts without responses, left-padded by the stages' own collation."""
    prompts = [(tokenizer(t, add_special_tokens=False)["input_ids"], []) for t in texts]
    batch = pad_pairs(prompts, tokenizer.pad_token_id)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_pads_and_scores(checkpoints, family):
    folder = checkpoints[family]
    assert (folder / "model.safetensors").exists()
    assert (AutoTokenizer.from_pretrained(folder).pad_token is None) == (family != "opt")
    tokenizer = load_tokenizer(folder)
    # a pad token of its own where the tokenizer has one (OPT), else EOS; left padding for generation
    expected_pad = "<pad>" if family == "opt" else tokenizer.eos_token
    assert tokenizer.pad_token == expected_pad and tokenizer.padding_side == "left"
    assert max_positions(folder) == POSITIONS

    model = load_causal_lm(folder, gradient_checkpointing=True)
    # the layers recompute their activations in backward (the flag both transformers 5 APIs set)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ids, mask = left_padded(tokenizer, ["is the lamp good?", f"{H}hi there{A} hello, how can I help?"])
    alone_ids, alone_mask = left_padded(tokenizer, ["is the lamp good?"])
    value_model = ValueModel.from_causal_lm(folder)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        alone = model(input_ids=alone_ids, attention_mask=alone_mask, position_ids=position_ids(alone_mask))
        # left padding changes nothing for the shorter row: positions skip the pads
        assert torch.allclose(batch[0, -alone_ids.shape[1] :], alone.logits[0], atol=1e-4)
        scores = value_model.score(ids, mask)
        assert torch.allclose(scores[0], value_model.score(alone_ids, alone_mask)[0], atol=1e-4)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert scores.shape == (2,) and generated.shape[0] == 2 and generated.shape[1] <= ids.shape[1] + 4


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_in_the_loss_pass(checkpoints, family):
    """Train mode for the loss pass, dropout off: GPT-2's and OPT's configs keep their 0.1 dropout."""
    folder = checkpoints[family]

    def stack(gradient_checkpointing: bool) -> PolicyStack:
        torch.manual_seed(0)  # the same fresh value heads
        roles = [load_causal_lm(folder), load_causal_lm(folder), ValueModel.from_causal_lm(folder)]
        return PolicyStack(*roles, ValueModel.from_causal_lm(folder), gradient_checkpointing)

    tokenizer = load_tokenizer(folder)
    prompt_ids, prompt_mask = left_padded(tokenizer, ["is the lamp good?", f"{H}hi there{A}"])
    responses = tokenizer(
        [" yes, it is", " hello"], add_special_tokens=False, padding=True, padding_side="right"
    )
    response_ids = torch.tensor(responses["input_ids"])
    zeros = torch.zeros(len(response_ids))
    rollouts = Rollouts(
        prompt_ids, prompt_mask, response_ids, torch.tensor(responses["attention_mask"]), torch.arange(2),
        *[torch.zeros_like(response_ids, dtype=torch.float)] * 3, zeros, zeros,
    )  # fmt: skip
    assert_checkpointed_loss_pass_matches(stack(False), stack(True), rollouts)


def test_every_real_model_option_is_checked():
    real = {
        p.stem
        for p in (CONF / "model").glob("*.yaml")
        if compose_config([f"model={p.stem}"]).model.name_or_path
    }
    assert real == set(MODEL_OPTIONS)


@pytest.mark.parametrize("option", MODEL_OPTIONS)
def test_model_option_fits_its_architecture(checkpoints, option):
    cfg = compose_config([f"model={option}"]).model
    family = MODEL_OPTIONS[option]
    assert not cfg.trust_remote_code and cfg.max_length <= 4096
    module_names = {
        name.rsplit(".", 1)[-1] for name, _ in load_causal_lm(checkpoints[family]).named_modules()
    }
    assert set(cfg.lora_target_modules) <= module_names, f"{option}: LoRA targets missing in {family}"
    tokenizer = load_tokenizer(checkpoints[family])
    prompt = cfg.prompt_template.format(prompt=f"{H}hi{A}")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # OPT and LLaMA were trained with BOS first; the template puts it there (tokenised without specials)
    assert (ids[0] == tokenizer.bos_token_id) == (family in ("opt", "llama"))


# --------------------------------------------------------------------------- stages and rollouts


def hh_files(folder: Path, n_train: int = 40, n_test: int = 20) -> str:
    train = write_jsonl(folder / "train.jsonl", [hh_row(i) for i in range(n_train)])
    test = write_jsonl(folder / "test.jsonl", [hh_row(i) for i in range(1000, 1000 + n_test)])
    return f"{{train: '{train}', test: '{test}'}}"


SMALL = [
    "task=hh_rlhf",
    "task.path=json",
    "task.n_eval_prompts=4",
    "model.max_length=64",
    "sft.epochs=1",
    "sft.batch_size=8",
    "reward_model.epochs=1",
    "reward_model.batch_size=8",
    "rollout.samples_per_iteration=8",
    "rollout.max_new_tokens=8",
    "rollout.eval_samples=1",
    "algorithm.minibatch_size=8",
]


@pytest.mark.parametrize(
    ("option", "rm_init"), [("pythia-160m", "base"), ("opt-350m", "sft"), ("llama-7b", "sft")]
)
def test_stages_and_a_rollout_from_a_pretrained_base(checkpoints, tmp_path, option, rm_init):
    """The model options as they are (LLaMA in bfloat16, with its template) but for name_or_path."""
    family = MODEL_OPTIONS[option]
    cfg = compose_config(
        [
            *SMALL,
            f"model={option}",
            f"model.name_or_path={checkpoints[family]}",
            f"task.data_files={hh_files(tmp_path)}",
            f"reward_model.init={rm_init}",
            f"paths.artifacts={tmp_path / 'artifacts'}",
        ]
    )
    task = instantiate(cfg.task)
    assert task.rl_prompts()[0].startswith(cfg.model.prompt_template.removesuffix("{prompt}") + H)
    stages = prepare_stages(cfg, task, stage_rows_to(lambda row: None))
    assert stages.base == str(checkpoints[family])
    # 20% / 40% of the 40 train rows
    assert stages.sft_metrics["sft/train_examples"] == 8 and stages.rm_metrics["rm/train_pairs"] == 16
    tokenizer = load_tokenizer(stages.sft)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    stack = build_policy_stack(stages.sft, stages.reward, stages.critic, cfg.model)
    shaper = RewardShaper(normalize="none", clip=None, missing_eos_penalty=None)
    # the actor is the reference before any update: a separate forward pass gives it the reference's
    # log-probs; generation's own (cached, token by token) agree up to the dtype's rounding, which in
    # bfloat16 (LLaMA's option) is 2^-8 relative
    bf16 = cfg.model.dtype == "bfloat16"
    for logprobs, tolerance in (("forward", 1e-4), ("generate", 5e-3 if bf16 else 1e-4)):
        rollout_cfg = OmegaConf.merge(cfg.rollout, {"logprobs": logprobs})
        collector = RolloutCollector(
            stack, tokenizer, task, shaper, "k1", rollout_cfg, 64, torch.device("cpu")
        )
        rollouts = collector.collect(task.rl_prompts()[:2], samples_per_prompt=2, with_values=True)
        assert rollouts.scores.isfinite().all() and rollouts.values.shape == rollouts.response_mask.shape
        assert rollouts.kl.abs().max() < tolerance, logprobs


def test_end_to_end_run_with_a_gpt2_checkpoint_on_hh_rlhf(checkpoints, tmp_path):
    args = [
        *SMALL,
        "model=gpt2",
        f"model.name_or_path={checkpoints['gpt2']}",
        "model.gradient_checkpointing=true",
        f"task.data_files={hh_files(tmp_path)}",
        "iterations=2",
        "rollout.eval_every=1",
        "logger.mode=disabled",
        f"paths.artifacts={tmp_path / 'artifacts'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    run_entry(args, cwd=tmp_path)
    rows = [r for r in read_history(tmp_path / "run") if "iteration" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and "train/loss" in rows[-1]
    summary = read_summary(tmp_path / "run")
    assert summary["model"] == "gpt2" and summary["task"] == "hh_rlhf" and summary["samples"] == 16
    assert {"rows/train/sft", "rows/train/reward", "rows/train/rl"} <= set(summary["data"])
    sft = next(p for p in (tmp_path / "artifacts").glob("sft-*") if p.is_dir())
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.model.name_or_path == str(checkpoints["gpt2"])
    assert load_tokenizer(sft).pad_token == EOT  # GPT-2 has none: EOS pads, saved with the SFT model
