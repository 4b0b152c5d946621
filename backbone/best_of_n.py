"""Best-of-n sampling from the SFT policy: the reference curve of the gold-vs-KL frontier.

Gao, Schulman and Hilton (2022), "Scaling Laws for Reward Model Overoptimization", section 2:
best-of-n (BoN) draws n responses from the initial policy and returns the one the proxy (the
reward model) scores highest. It optimises the proxy with no training, and its distance from
the initial policy is known in closed form:

    KL_bon(n) = log n - (n - 1) / n

(exact when the proxy's scores are distinct; an upper bound otherwise). Its gold is estimated
without drawing n fresh samples for every n: from N >= n samples of one prompt sorted by proxy
score ascending, the i-th (1-based) is the best of a uniformly random n-subset with probability

    w_i(n) = C(i - 1, n - 1) / C(N, n)          (sum_i w_i(n) = 1, zero for i < n)

so sum_i w_i(n) * gold_i is an unbiased estimate of E[gold of the best of n], and N samples
serve every n <= N. Ties in proxy score: the best of a subset whose maximum is tied is one of
the tied samples at random; averaging over that draw is the same as giving every sample the mean
gold of its tie group before weighting, which is what ``tie_averaged`` does.

The curve (n = 1, 2, 4, ..., N; per prompt, then averaged over the eval prompts) is an artifact
(``backbone.artifacts``) keyed by the SFT and reward-model artifacts and the sampling settings,
so every run of a sweep that shares them computes it once; each run copies its ``best_of_n.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from scipy.special import gammaln
from torch import Tensor

from backbone import distributed
from backbone.artifacts import config_hash, get_or_build
from backbone.batch import Rollouts
from backbone.models import load_tokenizer
from backbone.reward import RewardShaper
from backbone.roles import build_policy_stack
from backbone.rollout import RolloutCollector, response_mask_upto_eos
from backbone.stages import StageArtifacts
from backbone.tasks.base import Task

logger = logging.getLogger(__name__)

BEST_OF_N_FILE = "best_of_n.json"
# part of the artifact key: bump it when a change here changes what the curve holds
BEST_OF_N_VERSION = 1
# the collector's knobs that shape the sampling distribution (and so the curve)
SAMPLING_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p")


# --------------------------------------------------------------------------- the estimator


def bon_kl(n: int) -> float:
    """KL(best-of-n || initial policy) = log n - (n - 1) / n, in nats."""
    return math.log(n) - (n - 1) / n


def bon_weights(num_samples: int, n: int) -> np.ndarray:
    """w_i = C(i-1, n-1) / C(N, n) for i = 1..N (ascending proxy score): P(the i-th is the best of a
    random n-subset), [N]. In log space: log C(a, b) = lgamma(a+1) - lgamma(b+1) - lgamma(a-b+1)."""
    if not 1 <= n <= num_samples:
        raise ValueError(f"best-of-{n} needs 1 <= n <= N = {num_samples} samples")
    i = np.arange(n, num_samples + 1, dtype=float)  # positions that can be the best; w = 0 below n
    log_c = gammaln(i) - gammaln(n) - gammaln(i - n + 1)  # log C(i-1, n-1)
    log_total = gammaln(num_samples + 1) - gammaln(n + 1) - gammaln(num_samples - n + 1)  # log C(N, n)
    weights = np.zeros(num_samples)
    weights[n - 1 :] = np.exp(log_c - log_total)
    return weights


def tie_averaged(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` ordered by ascending ``scores``, each replaced by the mean over its tie group of
    scores (ties broken at random, in expectation), [..., N] -> [..., N]."""
    scores, values = np.asarray(scores, dtype=float), np.asarray(values, dtype=float)
    flat_scores, flat_values = scores.reshape(-1, scores.shape[-1]), values.reshape(-1, values.shape[-1])
    out = np.empty_like(flat_values)
    for row, (s, v) in enumerate(zip(flat_scores, flat_values)):
        order = np.argsort(s, kind="stable")
        s, v = s[order], v[order]
        _, group = np.unique(s, return_inverse=True)  # tie group of each sorted sample
        out[row] = (np.bincount(group, weights=v) / np.bincount(group))[group]
    return out.reshape(values.shape)


def bon_estimate(scores: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Unbiased E[value of the best of n by score] per row from N samples: sum_i w_i(n) * value_(i),
    [..., N] -> [...]. ``values`` may be the gold reward or the proxy score itself."""
    ordered = tie_averaged(scores, values)  # [..., N]
    return ordered @ bon_weights(ordered.shape[-1], n)


def bon_ns(n_max: int) -> list[int]:
    """n = 1, 2, 4, ... up to ``n_max``, and ``n_max`` itself when it is no power of 2."""
    ns = [2**k for k in range(int(math.log2(n_max)) + 1)] if n_max >= 1 else []
    return ns + ([n_max] if ns and ns[-1] != n_max else [])


def bon_rows(scores: np.ndarray, gold: np.ndarray | None, ns: list[int]) -> list[dict]:
    """The curve from N samples of P prompts (``scores``, ``gold``: [P, N]): per n, the per-prompt
    estimates averaged over prompts, with the analytic KL."""
    scores = np.asarray(scores, dtype=float)
    proxy_sorted = tie_averaged(scores, scores)  # [P, N]
    gold_sorted = tie_averaged(scores, gold) if gold is not None else None  # [P, N]
    rows = []
    for n in ns:
        w = bon_weights(scores.shape[-1], n)  # [N]
        kl = bon_kl(n)
        rows.append(
            {
                "n": n,
                "kl": kl,
                "sqrt_kl": math.sqrt(kl),
                "gold_mean": float(np.mean(gold_sorted @ w)) if gold_sorted is not None else float("nan"),
                "reward_mean": float(np.mean(proxy_sorted @ w)),
            }
        )
    return rows


# --------------------------------------------------------------------------- sampling


def _rng_devices(device: torch.device) -> list[int]:
    return list(range(torch.cuda.device_count())) if device.type == "cuda" else []


@torch.no_grad()
def _score_chunk(
    collector: RolloutCollector, prompts: list[str], num_samples: int
) -> tuple[Tensor, Tensor | None]:
    """``collector.collect`` without the actor's and the reference's log-prob passes (best-of-n needs
    neither; they cost as much as generating): raw scores and gold, each [p * N], prompt-major."""
    prompt_ids, prompt_mask = collector.encode_prompts(prompts, num_samples)  # [p * N, P]
    sequences = collector.stack.actor.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=collector.generation_config(greedy=False),
        synced_gpus=collector.synced_gpus,
    )  # [p * N, P + T]
    tokenizer, empty = collector.tokenizer, torch.empty(0)
    response_ids = sequences[:, prompt_ids.shape[1] :]  # [p * N, T]
    response_mask, _ = response_mask_upto_eos(response_ids, tokenizer.eos_token_id)
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    group = torch.arange(len(prompts), device=prompt_ids.device).repeat_interleave(num_samples)
    rollouts = Rollouts(
        prompt_ids, prompt_mask, response_ids, response_mask, group, empty, empty, empty, empty, empty
    )
    scores = collector.stack.score(rollouts).float()  # [p * N]
    if not collector.task.has_gold:
        return scores, None
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    gold = collector.task.gold_reward([p for p in prompts for _ in range(num_samples)], responses)
    return scores, torch.tensor(gold, dtype=torch.float32)


def sample_scores(
    collector: RolloutCollector, prompts: list[str], num_samples: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """``num_samples`` responses per prompt from the collector's actor, with its sampling settings:
    raw reward-model scores and gold rewards (None without a gold reward), each [P, N]. About
    ``chunk_size`` responses are generated at a time (at least one prompt's N)."""
    per_chunk = max(1, chunk_size // num_samples)
    scores, gold = [], []
    for start in range(0, len(prompts), per_chunk):
        chunk = prompts[start : start + per_chunk]
        chunk_scores, chunk_gold = _score_chunk(collector, chunk, num_samples)
        scores.append(chunk_scores.view(len(chunk), num_samples).cpu().numpy())  # [p, N]
        if chunk_gold is not None:
            gold.append(chunk_gold.view(len(chunk), num_samples).numpy())  # [p, N]
    return np.concatenate(scores), (np.concatenate(gold) if gold else None)


def best_of_n_curve(
    collector: RolloutCollector, prompts: list[str], n_max: int = 256, seed: int = 0, chunk_size: int = 1024
) -> list[dict]:
    """Best-of-n of the collector's actor (the SFT policy: call it before any update) for
    n = 1, 2, 4, ..., ``n_max``: rows {n, kl, sqrt_kl, gold_mean, reward_mean}.

    Draws ``n_max`` samples per prompt under ``seed`` inside ``torch.random.fork_rng``: the
    caller's random streams are left as they were."""
    if n_max < 1 or not prompts:
        raise ValueError(
            f"best-of-n needs n_max >= 1 and prompts (got n_max={n_max}, {len(prompts)} prompts)"
        )
    with torch.random.fork_rng(devices=_rng_devices(collector.device)):
        torch.manual_seed(seed)
        scores, gold = sample_scores(collector, prompts, n_max, chunk_size)  # [P, N]
    return bon_rows(scores, gold, bon_ns(n_max))


# --------------------------------------------------------------------------- the cached artifact


def frontier_prompts(cfg: DictConfig, task: Task) -> list[str]:
    """The eval prompts best-of-n samples for: all of them, or the first ``frontier.prompts``."""
    prompts = task.eval_prompts()
    return prompts if cfg.frontier.prompts is None else prompts[: cfg.frontier.prompts]


def best_of_n_key(cfg: DictConfig, stages: StageArtifacts, prompts: list[str]) -> dict:
    """What determines the curve. The artifact folders' names are the hashes of the SFT and
    reward-model keys (``backbone.artifacts``), so they stand for those keys."""
    return {
        "version": BEST_OF_N_VERSION,
        "sft": Path(stages.sft).name,
        "reward": Path(stages.reward).name,
        "n_max": cfg.frontier.best_of_n,
        "seed": cfg.frontier.seed,
        "chunk_size": cfg.frontier.chunk_size,  # the batches the seeded draws fall into
        "sampling": {k: cfg.rollout[k] for k in SAMPLING_KEYS},
        "max_length": cfg.model.max_length,
        "prompts": {"count": len(prompts), "hash": config_hash(prompts)},
    }


def best_of_n_artifact(cfg: DictConfig, task: Task, stages: StageArtifacts, device: torch.device) -> Path:
    """The artifact folder holding ``best_of_n.json`` for this run's SFT and reward model, computed on a
    miss from a fresh actor (the SFT model) and reward model."""
    prompts = frontier_prompts(cfg, task)
    key = best_of_n_key(cfg, stages, prompts)

    def build(folder: Path) -> None:
        started = time.perf_counter()
        # the stack loads inside the fork too: nothing it draws (a fresh head) reaches the run's streams
        with torch.random.fork_rng(devices=_rng_devices(device)):
            tokenizer = load_tokenizer(stages.sft, trust_remote_code=cfg.model.trust_remote_code)
            stack = build_policy_stack(stages.sft, stages.reward, None, cfg.model)
        stack.to(device)
        shaper = RewardShaper(normalize="none", clip=None, missing_eos_penalty=None)  # raw scores are used
        collector = RolloutCollector(
            stack, tokenizer, task, shaper, cfg.kl.estimator, cfg.rollout, cfg.model.max_length, device
        )
        rows = best_of_n_curve(
            collector, prompts, cfg.frontier.best_of_n, cfg.frontier.seed, cfg.frontier.chunk_size
        )
        wall = time.perf_counter() - started
        record = {
            "artifact": f"best_of_n-{config_hash(key)}",  # the artifact folder's name
            "key": key,
            "prompts": len(prompts),
            "samples_per_prompt": cfg.frontier.best_of_n,
            "wall_time_s": wall,
            "rows": rows,
        }
        (folder / BEST_OF_N_FILE).write_text(json.dumps(record, indent=2))
        logger.info("best-of-%d over %d prompts: %.1f s", cfg.frontier.best_of_n, len(prompts), wall)

    return get_or_build(cfg.paths.artifacts, "best_of_n", key, build)


def write_best_of_n(
    cfg: DictConfig, task: Task, stages: StageArtifacts, device: torch.device, run_dir: Path
) -> Path | None:
    """Copy the (cached) best-of-n curve into ``run_dir/best_of_n.json``; None on ranks other than 0."""
    folder = best_of_n_artifact(cfg, task, stages, device)
    if not distributed.is_main():
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(folder / BEST_OF_N_FILE, run_dir / BEST_OF_N_FILE))
