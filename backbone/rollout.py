"""Generation and scoring: prompts in, a ``Rollouts`` batch out.

The actor samples n responses per prompt (batched, KV cache, left-padded prompts, stop at
EOS); then, on the finished sequences, one forward pass per frozen role gives the reference's
token log-probs, the critic's values when asked, and the reward model's score. The actor's
log-probs come from the raw logits generation already computed (``rollout.logprobs=generate``:
a forward pass computes the same up to float rounding, so the first PPO ratio is 1 within
rounding), or from a separate pass by the loss's own function (``forward``: exactly 1). With both
full distributions at hand, the exact KL to the reference (summed over the vocabulary) is
logged beside the sampled estimate.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase

from backbone.batch import Rollouts
from backbone.kl import exact_kl, kl_estimate
from backbone.models import PolicyStack
from backbone.reward import RewardShaper
from backbone.tasks.base import Task
from backbone.timing import PhaseTimer

# what a forward pass reads of a batch of rollouts
SEQUENCE_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


def response_mask_upto_eos(response_ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """1 on response tokens up to and including the first EOS, [B, T]; and whether EOS came, [B]."""
    is_eos = response_ids == eos_id  # [B, T]
    ended = is_eos.any(dim=1)  # [B]
    # EOS positions counted so far, excluding the current token: 0 means "still inside the response"
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long(), ended


class RolloutCollector:
    """Samples from the actor and scores with the frozen roles; owns no trainable state."""

    def __init__(
        self,
        stack: PolicyStack,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        shaper: RewardShaper,
        kl_estimator: str,
        rollout_cfg,
        max_length: int,
        device: torch.device,
    ):
        self.stack = stack
        self.tokenizer = tokenizer
        self.task = task
        self.shaper = shaper
        self.kl_estimator = kl_estimator
        self.cfg = rollout_cfg
        self.device = device
        self.timer = PhaseTimer(device)
        # ZeRO-3 ranks gather weights together at every forward: all keep generating until the
        # last rank's responses are done
        self.synced_gpus = False
        self.max_prompt_len = max_length - rollout_cfg.max_new_tokens
        if self.max_prompt_len < 1:
            raise ValueError(
                f"rollout.max_new_tokens={rollout_cfg.max_new_tokens} leaves no room for a prompt in "
                f"model.max_length={max_length}"
            )

    def generation_config(self, greedy: bool, with_logits: bool = False) -> GenerationConfig:
        """Explicit sampling knobs: a model's saved generation_config (top_k=50, ...) must not leak in.
        ``with_logits``: ``generate`` returns its raw logits (before temperature and top-k) with the
        sequences."""
        sampling = (
            {}
            if greedy
            else {"temperature": self.cfg.temperature, "top_k": self.cfg.top_k, "top_p": self.cfg.top_p}
        )
        return GenerationConfig(
            do_sample=not greedy,
            max_new_tokens=self.cfg.max_new_tokens,
            min_new_tokens=self.cfg.min_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            return_dict_in_generate=with_logits,
            output_logits=with_logits,
            **sampling,
        )

    def encode_prompts(self, prompts: list[str], samples_per_prompt: int) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, each prompt repeated n times in a row: [B * n, P]."""
        encoded = [
            self.tokenizer(p, add_special_tokens=False)["input_ids"][-self.max_prompt_len :] for p in prompts
        ]
        if any(len(ids) == 0 for ids in encoded):
            empty = next(p for p, ids in zip(prompts, encoded) if len(ids) == 0)
            raise ValueError(f"prompt {empty!r} tokenises to nothing")
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, row in enumerate(encoded):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return (
            ids.repeat_interleave(samples_per_prompt, dim=0).to(self.device),
            mask.repeat_interleave(samples_per_prompt, dim=0).to(self.device),
        )

    def count_truncated(self, prompts: list[str]) -> int:
        """Prompts longer than the room generation leaves them; ``encode_prompts`` keeps their end."""
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return sum(len(ids) > self.max_prompt_len for ids in encoded)

    def encode_responses(self, responses: list[str]) -> Tensor:
        """Given responses as ids closed by EOS, right-padded, cut at max_new_tokens: [B, T]."""
        eos, limit = self.tokenizer.eos_token_id, self.cfg.max_new_tokens
        rows = [[*self.tokenizer(r, add_special_tokens=False)["input_ids"], eos][:limit] for r in responses]
        ids = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids.to(self.device)

    def actor_logits(self, rollouts: Rollouts, generated: tuple[Tensor, ...] | None) -> Tensor:
        """The sampling policy's logits at the response positions, [B, T, V]: the ones generation
        computed, one [B, V] per step, for the sampled rows (zero past the last step, where every
        row is a pad); a forward pass for rows taken from the data, and for everything with
        ``rollout.logprobs=forward``."""
        if generated is None:
            return self.stack.actor_logits(rollouts)
        logits = torch.stack(generated, dim=1)  # [n_sampled, T_generated, V]
        missing = rollouts.response_ids.shape[1] - logits.shape[1]  # longer given responses
        if missing:  # a [B, T, V] copy, made only when needed
            logits = F.pad(logits, (0, 0, 0, missing))
        if rollouts.sampled is None:
            return logits
        rows = torch.nonzero(~rollouts.sampled).flatten()
        given = replace(rollouts, **{key: getattr(rollouts, key)[rows] for key in SEQUENCE_FIELDS})
        return torch.cat([logits, self.stack.actor_logits(given)])  # sampled rows come first

    @torch.no_grad()
    def collect(
        self,
        prompts: list[str],
        samples_per_prompt: int = 1,
        kl_coef: float = 0.0,
        with_values: bool = False,
        greedy: bool = False,
        group_offset: int = 0,
        update_stats: bool = True,
        given_responses: list[str] | None = None,
    ) -> Rollouts:
        """n responses per prompt, scored; ``update_stats=False`` for evaluation (reward statistics
        unchanged). ``given_responses`` (one per prompt, e.g. the data's chosen ones) join their
        prompt's group teacher-forced, marked ``sampled=False``."""
        prompt_ids, prompt_mask = self.encode_prompts(prompts, samples_per_prompt)  # [B, P]
        with_logits = self.cfg.logprobs == "generate"
        with self.timer.phase("generate"):
            generated = self.stack.actor.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=self.generation_config(greedy, with_logits),
                synced_gpus=self.synced_gpus,
            )
        sequences, generated_logits = (
            (generated.sequences, generated.logits) if with_logits else (generated, None)
        )
        response_ids = sequences[:, prompt_ids.shape[1] :]  # [B, T]
        group = torch.arange(len(prompts), device=self.device).repeat_interleave(samples_per_prompt)
        row_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        sampled = None
        if given_responses is not None:
            given = self.encode_responses(given_responses)  # [n_prompts, T']
            width = max(response_ids.shape[1], given.shape[1])
            pad = self.tokenizer.pad_token_id
            response_ids = torch.cat(
                [
                    F.pad(response_ids, (0, width - response_ids.shape[1]), value=pad),
                    F.pad(given, (0, width - given.shape[1]), value=pad),
                ]
            )
            prompt_ids = torch.cat([prompt_ids, prompt_ids[::samples_per_prompt]])
            prompt_mask = torch.cat([prompt_mask, prompt_mask[::samples_per_prompt]])
            group = torch.cat([group, torch.arange(len(prompts), device=self.device)])
            sampled = torch.arange(len(group), device=self.device) < len(prompts) * samples_per_prompt
            row_prompts = [*row_prompts, *prompts]
        return self.score(
            prompt_ids,
            prompt_mask,
            response_ids,
            group + group_offset,
            row_prompts,
            kl_coef,
            sampled=sampled,
            generated_logits=generated_logits,
            with_values=with_values,
            update_stats=update_stats,
        )

    @torch.no_grad()
    def collect_given(
        self,
        prompts: list[str],
        responses: list[str],
        kl_coef: float = 0.0,
        with_values: bool = False,
        group_size: int = 2,
        update_stats: bool = True,
    ) -> Rollouts:
        """Given (prompt, response) rows, teacher-forced and scored as ``collect`` scores samples; rows
        ``group_size`` at a time share a group (a preference pair: chosen, rejected). None is sampled."""
        prompt_ids, prompt_mask = self.encode_prompts(prompts, 1)  # [B, P]
        response_ids = self.encode_responses(responses)  # [B, T]
        group = torch.arange(len(prompts), device=self.device) // group_size
        sampled = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        return self.score(
            prompt_ids,
            prompt_mask,
            response_ids,
            group,
            list(prompts),
            kl_coef,
            sampled=sampled,
            with_values=with_values,
            update_stats=update_stats,
        )

    def score(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        response_ids: Tensor,
        group: Tensor,
        prompts: list[str],
        kl_coef: float,
        sampled: Tensor | None = None,
        generated_logits: tuple[Tensor, ...] | None = None,
        with_values: bool = False,
        update_stats: bool = True,
    ) -> Rollouts:
        """The finished sequences' log-probs (actor and reference), KL, values, scores and gold."""
        response_mask, ended = response_mask_upto_eos(response_ids, self.tokenizer.eos_token_id)
        response_ids = torch.where(response_mask.bool(), response_ids, self.tokenizer.pad_token_id)
        rollouts = Rollouts(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            group=group,
            sampled=sampled,
            logprobs=torch.empty(0),
            ref_logprobs=torch.empty(0),
            kl=torch.empty(0),
            scores=torch.empty(0),
            rewards=torch.empty(0),
            kl_coef=kl_coef,
            prompts=prompts,
        )
        with self.timer.phase("actor_forward"):
            logprobs = F.log_softmax(
                self.actor_logits(rollouts, generated_logits).float(), dim=-1
            )  # [B, T, V]
        with self.timer.phase("reference_forward"):
            ref_logprobs = F.log_softmax(self.stack.reference_logits(rollouts).float(), dim=-1)  # [B, T, V]
        labels = response_ids.unsqueeze(-1)
        rollouts.logprobs = logprobs.gather(-1, labels).squeeze(-1) * response_mask  # [B, T]
        rollouts.ref_logprobs = ref_logprobs.gather(-1, labels).squeeze(-1) * response_mask  # [B, T]
        rollouts.kl_exact = exact_kl(logprobs, ref_logprobs) * response_mask  # [B, T]
        del logprobs, ref_logprobs
        rollouts.kl = kl_estimate(rollouts.logprobs, rollouts.ref_logprobs, self.kl_estimator) * response_mask
        if with_values:
            with self.timer.phase("critic_forward"):
                rollouts.values = self.stack.critic_values(rollouts)  # [B, T], or [B] per sequence
        with self.timer.phase("reward_forward"):
            rollouts.scores = self.stack.score(rollouts)  # [B]
        rollouts.rewards = self.shaper(rollouts.scores, ended, update_stats, rollouts.sampled)  # [B]
        rollouts.responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        if self.task.has_gold:
            with self.timer.phase("gold"):
                gold = self.task.gold_reward(rollouts.prompts, rollouts.responses)
            rollouts.gold = torch.tensor(gold, dtype=torch.float32, device=self.device)
        return rollouts
