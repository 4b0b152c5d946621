"""The stages before RL: base model, supervised fine-tuning, reward model.

``prepare_stages`` builds each stage as an artifact (``backbone.artifacts``) keyed by
everything that determines it, so every job of a sweep that shares a task, a model and
the stage configs trains them once and starts RL from the very same SFT model and reward
model. Each artifact folder holds the tokenizer, the model (``save_pretrained``,
safetensors) and ``metrics.json`` (the stage's final metrics and wall time). Under
``peft=lora_multi_adapter`` SFT still trains the full weights, and the reward model is a LoRA
adapter on the SFT model (PEFT's format) beside its value head. A critic may start from a reward
model of another pooling than the reward's (``critic.init=reward_mean``, say): the same stage with
only the pooling changed, a second artifact built once and shared like the first.

Each stage a job builds is reported through a ``StageLog``: the run opens a W&B run of the stage's
own for it (``experiments.run``), entered before it trains and left once its folder is in place.

Sequences follow the layout of ``backbone.batch``: prompt left-padded, response (closed
by EOS) right-padded, so every response of a batch starts at the same column.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from scipy.stats import spearmanr
from torch import Tensor, nn

from backbone.artifacts import artifact_folder, get_or_build, plain
from backbone.engine import lr_lambda, resolve_device
from backbone.lora import add_lora
from backbone.models import (
    ValueModel,
    build_tiny_causal_lm,
    encode_pair,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    pad_pairs,
    position_ids,
    train_word_tokenizer,
)
from backbone.progress import progress
from backbone.tasks.base import Task

logger = logging.getLogger(__name__)

Log = Callable[[dict], None]
Pairs = list[tuple[list[int], list[int]]]  # (prompt_ids, response_ids) per row

METRICS_FILE = "metrics.json"
# part of every artifact key: bump it when a change here changes what a stage produces
STAGES_VERSION = 1
# the reward model's score statistics on chosen responses use at most this many train pairs
CHOSEN_STATS_MAX = 4096


@dataclass
class StageArtifacts:
    """Where RL starts from: the artifacts' paths and the metrics the stages recorded."""

    base: str | Path  # an artifact folder for the tiny model, else the model's name_or_path
    sft: Path
    reward: Path
    critic: Path  # where a critic starts (critic.init): a reward-model artifact, or the SFT model
    sft_metrics: dict
    rm_metrics: dict


@dataclass(frozen=True)
class StageBuild:
    """A stage this job builds: the artifact kind (sft, reward), the folder it will be in, the key it is
    built from (plain values) and the artifact folders it starts from."""

    kind: str
    folder: Path
    key: dict
    inputs: tuple[Path, ...]


# the record of one stage build: entered before it trains, it gives where the stage's rows go; it is
# exited once the artifact's folder is in place, or with the error that stopped the build
StageLog = Callable[[StageBuild], AbstractContextManager[Log]]


def stage_rows_to(log: Log) -> StageLog:
    """A StageLog that sends every stage's rows to ``log`` and records nothing else."""

    @contextmanager
    def record(build: StageBuild) -> Iterator[Log]:
        yield log

    return record


# --------------------------------------------------------------------------- data


def _require(rows: list, task: Task, what: str, split: str) -> list:
    if not rows:
        raise ValueError(f"task {task.name!r}: the {what} split {split!r} is empty")
    return rows


def encode_rows(tokenizer, rows: list[dict], response: str, max_length: int, what: str) -> tuple[Pairs, int]:
    """Tokenise (row["prompt"], row[response]) once, up front; returns the pairs and the truncated count."""
    pairs, truncated = [], 0
    for row in rows:
        prompt_ids, response_ids, cut = encode_pair(tokenizer, row["prompt"], row[response], max_length)
        pairs.append((prompt_ids, response_ids))
        truncated += cut
    if truncated:
        logger.warning(
            "%s: %d of %d rows over max_length=%d, truncated", what, truncated, len(rows), max_length
        )
    return pairs, truncated


def pretrain_texts(task: Task, split: str) -> list[str]:
    """The task's pretraining texts of ``split``; failing for a task that has none."""
    texts = task.pretrain_texts(split)
    if not texts:
        raise ValueError(
            f"task {task.name!r} has no pretraining texts in its {split} split, which ptx.source=pretrain "
            "and sft.mix_pretrain read (a preference task reads them from task.pretrain)"
        )
    return texts


def encode_texts(tokenizer, texts: list[str], max_length: int, what: str) -> Pairs:
    """Each text as a pair (x_0, its tokens + EOS) cut at ``max_length``, so that the SFT loss, which
    scores a pair's second part, scores every token of the text; x_0, the context of its first
    token, is the tokenizer's BOS (EOS where it has none, as GPT-2 separates documents)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pairs, truncated = [], 0
    for text in texts:
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        truncated += 1 + len(ids) > max_length
        pairs.append(([start], ids[: max_length - 1]))
    if truncated:
        logger.warning(
            "%s: %d of %d texts over max_length=%d, truncated", what, truncated, len(texts), max_length
        )
    return pairs


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[int]]:
    """Row indices in minibatches: shuffled by ``generator``, in order without one."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


# --------------------------------------------------------------------------- the shared training loop


def _optimizer(model: nn.Module, stage: DictConfig, total_steps: int):
    """AdamW (no decay on biases and norms) with linear warm-up, then cosine decay to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": stage.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, fused=True)  # as the RL engine's (engine.py)
    schedule = lr_lambda("cosine", round(stage.warmup_ratio * total_steps), total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _fit(
    model: nn.Module,
    stage: DictConfig,
    n_train: int,
    loss_fn: Callable[[list[int]], tuple[Tensor, dict[str, float]]],
    evaluate: Callable[[], dict[str, float]],
    log: Log,
    prefix: str,
) -> dict[str, float]:
    """Epochs of shuffled minibatches with clipping; evaluates before training, every
    ``eval_every`` steps and at the end. Logs one row per step under ``prefix/``.

    ``loss_fn(indices)`` returns the loss of those train rows and statistics to log;
    ``evaluate()`` returns held-out metrics. Returns the final evaluation.
    """
    total = stage.epochs * math.ceil(n_train / stage.batch_size)
    optimizer, scheduler = _optimizer(model, stage, total)
    generator = torch.Generator().manual_seed(stage.seed)

    def run_eval() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = {f"{prefix}/{k}": v for k, v in evaluate().items()}
        model.train()
        return metrics

    log({f"{prefix}/step": 0, **run_eval()})
    step, final = 0, {}
    with progress(total=total, desc=prefix, leave=False) as bar:
        for _ in range(stage.epochs):
            for indices in _batches(n_train, stage.batch_size, generator):
                loss, stats = loss_fn(indices)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                optimizer.step()
                scheduler.step()
                step += 1
                loss_value = loss.item()
                row = {f"{prefix}/step": step, f"{prefix}/loss": loss_value, f"{prefix}/lr": lr}
                row.update({f"{prefix}/{k}": v for k, v in stats.items()})
                if step % stage.eval_every == 0 or step == total:
                    final = run_eval()
                    row.update(final)
                log(row)
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                bar.update()
    model.eval()
    return final


def _finish(out_dir: Path, metrics: dict, prefix: str, started: float) -> dict:
    """Add the stage's wall time and write ``metrics.json`` next to the model."""
    metrics = {**metrics, f"{prefix}/wall_time_s": time.perf_counter() - started}
    (Path(out_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


# --------------------------------------------------------------------------- base model


def _base_key(cfg: DictConfig) -> dict:
    key = {"version": STAGES_VERSION, "task": cfg.task, "model": cfg.model}
    if cfg.model.name_or_path is None:
        key["init_seed"] = cfg.sft.seed  # the tiny model's random initialisation
    return key


def build_base(cfg: DictConfig, task: Task) -> str | Path:
    """The model SFT starts from: a locally built tiny model (an artifact), or ``model.name_or_path``."""
    model = cfg.model
    if model.name_or_path is not None:
        positions = max_positions(model.name_or_path, model.trust_remote_code)
        limit = f"the max_position_embeddings of {model.name_or_path}"
    else:
        positions, limit = model.n_positions, "model.n_positions"
    if positions is not None and model.max_length > positions:
        raise ValueError(f"model.max_length={model.max_length} exceeds {limit}={positions}")
    if model.name_or_path is not None:
        return model.name_or_path

    def build(folder: Path) -> None:
        tokenizer = train_word_tokenizer(task.corpus())
        torch.manual_seed(cfg.sft.seed)
        model = build_tiny_causal_lm(tokenizer, cfg.model)
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)

    return get_or_build(cfg.paths.artifacts, "base", _base_key(cfg), build)


# --------------------------------------------------------------------------- SFT


def sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed -log p of the response tokens (EOS included) and their count.

    Logits at column c predict the token at c + 1; prompt and pad positions carry no loss.
    """
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask)).logits
    targets = batch["input_ids"][:, 1:].masked_fill(batch["response_mask"][:, 1:] == 0, -100)  # [B, L-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return nll, (targets != -100).sum()


def pack_pairs(pairs: Pairs, block_size: int) -> list[tuple[list[int], list[int]]]:
    """StackLLaMA's packing (TRL's ConstantLengthDataset): the pairs' tokens as one stream, cut into
    blocks of ``block_size`` with no padding; the last block keeps the remainder, so every token is
    in exactly one block, in order.

    A pair is prompt + response, and the EOS that closes the response separates it from the next
    pair. Returns (ids, loss_mask) per block, the mask 1 on response tokens: the padded path's loss
    (a response token at a block's first column has no context and goes unpredicted). As in TRL,
    positions run on across pairs and attention crosses the separator.
    """
    ids = [token for prompt, response in pairs for token in (*prompt, *response)]
    loss_mask = [m for prompt, response in pairs for m in (*[0] * len(prompt), *[1] * len(response))]
    return [(ids[i : i + block_size], loss_mask[i : i + block_size]) for i in range(0, len(ids), block_size)]


def pad_blocks(blocks: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Tensor]:
    """Packed blocks, right-padded to the longest (only the stream's last block is short): input_ids,
    attention_mask and response_mask (the loss mask), each [B, L]."""
    width = max(len(ids) for ids, _ in blocks)
    input_ids = torch.full((len(blocks), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for i, (ids, loss_mask) in enumerate(blocks):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        response_mask[i, : len(ids)] = torch.tensor(loss_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def sft_train_rows(
    pairs: Pairs, packing: bool, max_length: int, pad: int
) -> tuple[list, Callable[[list], dict[str, Tensor]]]:
    """SFT's train rows and how a list of them becomes a batch: the pairs themselves, padded, or
    packed blocks of ``max_length`` (``sft.packing``)."""
    if packing:
        return pack_pairs(pairs, max_length), lambda rows: pad_blocks(rows, pad)
    return pairs, lambda rows: pad_pairs(rows, pad)


@torch.no_grad()
def mean_sft_loss(model: nn.Module, pairs: Pairs, pad: int, device: torch.device, batch_size: int) -> float:
    """Mean -log p per response token over ``pairs`` (the held-out SFT loss)."""
    nll, n = 0.0, 0
    for indices in _batches(len(pairs), batch_size):
        batch_nll, batch_n = sft_loss(model, _to(pad_pairs([pairs[i] for i in indices], pad), device))
        nll, n = nll + batch_nll.item(), n + int(batch_n)
    return nll / max(n, 1)


def train_sft(cfg: DictConfig, task: Task, base_path: str | Path, out_dir: str | Path, log: Log) -> dict:
    """Fine-tune the base causal LM on the task's demonstrations (and, with ``sft.mix_pretrain``, its
    pretraining train texts); save it and its tokenizer to ``out_dir``."""
    started = time.perf_counter()
    train_rows = _require(task.sft_examples("train"), task, "SFT", "train")
    eval_rows = _require(task.sft_examples("eval"), task, "SFT", "eval")
    device = resolve_device(cfg.engine.device)
    torch.manual_seed(cfg.sft.seed)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    model = load_causal_lm(
        base_path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.gradient_checkpointing
    ).to(device)
    max_length, pad = cfg.model.max_length, tokenizer.pad_token_id
    train, truncated = encode_rows(tokenizer, train_rows, "response", max_length, "SFT train")
    held_out, _ = encode_rows(tokenizer, eval_rows, "response", max_length, "SFT eval")
    # held-out metric name -> rows; pretraining texts are pairs too (x_0, every token scored)
    evaluated = {"eval_loss": held_out}
    texts = []
    if cfg.sft.mix_pretrain:
        texts = encode_texts(tokenizer, pretrain_texts(task, "train"), max_length, "SFT pretrain train")
        evaluated["pretrain_eval_loss"] = encode_texts(
            tokenizer, pretrain_texts(task, "eval"), max_length, "SFT pretrain eval"
        )
    rows, collate = sft_train_rows(train + texts, cfg.sft.packing, max_length, pad)
    tokens = 0

    def loss_fn(indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        nonlocal tokens
        nll, n = sft_loss(model, _to(collate([rows[i] for i in indices]), device))
        tokens += int(n)
        return nll / n.clamp(min=1), {"tokens": tokens}

    def evaluate() -> dict[str, float]:
        # held-out pairs are scored one per row in both modes, so the loss compares across them
        return {
            name: mean_sft_loss(model, pairs, pad, device, cfg.sft.batch_size)
            for name, pairs in evaluated.items()
        }

    final = _fit(model, cfg.sft, len(rows), loss_fn, evaluate, log, "sft")
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    metrics = {**final, "sft/tokens": tokens, "sft/truncated": truncated, "sft/train_examples": len(train)}
    if cfg.sft.mix_pretrain:
        metrics["sft/pretrain_texts"] = len(texts)
    return _finish(Path(out_dir), metrics, "sft", started)


# --------------------------------------------------------------------------- reward model


def pairwise_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Bradley-Terry: the mean over pairs of -log sigmoid(r_chosen - r_rejected); both [B]."""
    return -F.logsigmoid(chosen - rejected).mean()


def _score_batch(model: ValueModel, pairs: Pairs, pad: int, device: torch.device) -> Tensor:
    batch = _to(pad_pairs(pairs, pad), device)
    return model.score(batch["input_ids"], batch["attention_mask"], batch["response_mask"])  # [B]


def _score_all(model: ValueModel, pairs: Pairs, pad: int, device: torch.device, batch_size: int) -> Tensor:
    """Scores of many rows in no-grad minibatches, [N] on the CPU."""
    with torch.no_grad():
        return torch.cat(
            [
                _score_batch(model, [pairs[i] for i in idx], pad, device).cpu()
                for idx in _batches(len(pairs), batch_size)
            ]
        )


def train_reward_model(
    cfg: DictConfig,
    task: Task,
    init_path: str | Path,
    out_dir: str | Path,
    log: Log,
    pooling: str | None = None,
) -> dict:
    """Train a pairwise reward model from ``init_path`` (a causal LM); save it with its score statistics.
    It scores with ``pooling`` (last or mean; None: ``reward.pooling``).

    Held-out metrics: pairwise accuracy and, when the task has a gold reward, the Spearman
    correlation between score and gold over the held-out chosen and rejected responses.
    """
    started = time.perf_counter()
    rm_cfg = cfg.reward_model
    pooling = pooling or cfg.reward.pooling
    train_rows = _require(task.preference_pairs("train"), task, "preference", "train")
    eval_rows = _require(task.preference_pairs("eval"), task, "preference", "eval")
    device = resolve_device(cfg.engine.device)
    torch.manual_seed(rm_cfg.seed)  # seeds the fresh value head
    tokenizer = load_tokenizer(init_path, cfg.model.trust_remote_code)
    model = ValueModel.from_causal_lm(
        init_path,
        pooling=pooling,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    if cfg.peft.mode == "lora_multi_adapter":
        # the SFT body stays as the RL stack holds it: only the reward adapter and the head train
        model.body = add_lora(model.body, cfg.peft)
    model = model.to(device)
    max_length, pad = cfg.model.max_length, tokenizer.pad_token_id
    chosen, cut_chosen = encode_rows(tokenizer, train_rows, "chosen", max_length, "preference train (chosen)")
    rejected, cut_rejected = encode_rows(
        tokenizer, train_rows, "rejected", max_length, "preference train (rejected)"
    )
    eval_chosen, _ = encode_rows(tokenizer, eval_rows, "chosen", max_length, "preference eval (chosen)")
    eval_rejected, _ = encode_rows(tokenizer, eval_rows, "rejected", max_length, "preference eval (rejected)")
    gold = None
    if task.has_gold:
        prompts = [r["prompt"] for r in eval_rows]
        responses = [r["chosen"] for r in eval_rows] + [r["rejected"] for r in eval_rows]
        gold = task.gold_reward(prompts + prompts, responses)

    def loss_fn(indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        # chosen and rejected in one forward: [2B] scores, chosen first
        pairs = [chosen[i] for i in indices] + [rejected[i] for i in indices]
        r_chosen, r_rejected = _score_batch(model, pairs, pad, device).split(len(indices))
        accuracy = (r_chosen > r_rejected).float().mean().item()
        return pairwise_loss(r_chosen, r_rejected), {"accuracy": accuracy}

    def evaluate() -> dict[str, float]:
        scores = _score_all(model, eval_chosen + eval_rejected, pad, device, 2 * rm_cfg.batch_size)
        r_chosen, r_rejected = scores.split(len(eval_chosen))
        metrics = {"eval_accuracy": (r_chosen > r_rejected).float().mean().item()}
        if gold is not None:
            metrics["eval_spearman"] = float(spearmanr(scores.numpy(), gold).statistic)
        return metrics

    final = _fit(model, rm_cfg, len(chosen), loss_fn, evaluate, log, "rm")
    # alpaca-rlhf normalises RL rewards with the reward model's statistics on chosen responses
    stats = _score_all(model, chosen[:CHOSEN_STATS_MAX], pad, device, 2 * rm_cfg.batch_size)
    chosen_mean, chosen_std = stats.mean().item(), stats.std().item()
    model.save_pretrained(out_dir, pooling=pooling, chosen_mean=chosen_mean, chosen_std=chosen_std)
    tokenizer.save_pretrained(out_dir)
    metrics = {
        **final,
        "rm/chosen_mean": chosen_mean,
        "rm/chosen_std": chosen_std,
        "rm/truncated": cut_chosen + cut_rejected,
        "rm/train_pairs": len(chosen),
    }
    return _finish(Path(out_dir), metrics, "rm", started)


# --------------------------------------------------------------------------- the pipeline


def sft_config_key(sft: DictConfig) -> dict:
    """The SFT config in the artifact key; without sft.mix_pretrain it is the key from before that
    knob, so the SFT models (and what is built on them) already built are still found."""
    key = OmegaConf.to_container(sft, resolve=True)
    if not key["mix_pretrain"]:
        del key["mix_pretrain"]
    return key


def _read_metrics(folder: Path) -> dict:
    return json.loads((folder / METRICS_FILE).read_text())


def prepare_stages(cfg: DictConfig, task: Task, stage_log: StageLog) -> StageArtifacts:
    """Build or reuse base, SFT and reward model (and the reward model a critic starts from, when its
    pooling differs); each stage this job builds is recorded through ``stage_log``."""
    root = cfg.paths.artifacts

    def built(kind: str, key: dict, start: str | Path, train: Callable[[Path, Log], dict]) -> Path:
        # a locally built base is an artifact too; a name_or_path is not
        inputs = (start,) if isinstance(start, Path) else ()
        build = StageBuild(kind, artifact_folder(root, kind, key), plain(key), inputs)
        with ExitStack() as record:  # left after get_or_build has put the folder in place
            return get_or_build(
                root, kind, key, lambda folder: train(folder, record.enter_context(stage_log(build)))
            )

    base_key = _base_key(cfg)
    base = build_base(cfg, task)
    sft_key = {"base": base_key, "sft": sft_config_key(cfg.sft)}
    sft = built("sft", sft_key, base, lambda folder, log: train_sft(cfg, task, base, folder, log))
    init_key, init_path = (sft_key, sft) if cfg.reward_model.init == "sft" else (base_key, base)

    def reward_model(pooling: str) -> Path:
        # the same stage config, seed included, for every pooling: the models differ in it alone
        key = {"init": init_key, "reward_model": cfg.reward_model, "pooling": pooling}
        if cfg.peft.mode != "none":  # a LoRA reward model is another artifact (peft=none keeps its key)
            key["peft"] = cfg.peft
        return built(
            "reward",
            key,
            init_path,
            lambda out, log: train_reward_model(cfg, task, init_path, out, log, pooling),
        )

    reward = reward_model(cfg.reward.pooling)
    critic = {"reward": reward, "sft": sft}.get(cfg.critic.init)
    if critic is None:  # reward_last | reward_mean: the reward's own artifact when the poolings agree
        critic = reward_model(cfg.critic.init.removeprefix("reward_"))
    return StageArtifacts(base, sft, reward, critic, _read_metrics(sft), _read_metrics(reward))
