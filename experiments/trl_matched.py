"""TRL's trainers at the matched shapes of the README's TRL comparison, timed per optimiser step.

Run in a separate environment with TRL (it does not import this project):

    python -m venv trl116 && trl116/bin/pip install torch==2.13.0 "trl==1.16.*"   # GRPO, RLOO
    python -m venv trl112 && trl112/bin/pip install torch==2.13.0 "trl==1.12.*"   # PPO (its last release)
    trl116/bin/python experiments/trl_matched.py grpo --sft ART/sft-* --rm ART/reward-* --prompts prompts.json

``--sft`` and ``--rm`` are the stage folders the project's benchmark built at the same shape
(``paths.artifacts=ART``); ``--prompts`` a JSON list of the task's RL prompts. The shapes: 64
completions per step of exactly 48 new tokens, one minibatch of 64, groups of 8 (GRPO, RLOO), fp32,
no gradient checkpointing (TRL's GRPO default is on), ``--threads`` intra-op threads. The reward
model is the project's trunk in ``GPT2ForSequenceClassification`` (its score head untrained: the
time is the same); RLOO scores with a Python function, as in the issue's table. Prints one JSON line:
the seconds between consecutive optimiser steps after ``--warmup`` steps.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2ForSequenceClassification, TrainerCallback

COMPLETIONS, NEW_TOKENS, GROUP = 64, 48, 8


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.ends = [time.perf_counter()]

    def on_step_end(self, *args, **kwargs) -> None:
        self.ends.append(time.perf_counter())


def length_reward(completions, **kwargs) -> list[float]:
    """RLOO's reward: a function, no reward-model pass."""
    return [float(len(c)) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=["grpo", "rloo", "ppo"])
    parser.add_argument("--sft", required=True)
    parser.add_argument("--rm", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--epochs", type=int, default=1, help="PPO epochs / GRPO num_iterations")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import trl

    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    tokenizer.padding_side = "left"
    with open(args.prompts) as file:
        prompts = json.load(file)
    steps = args.warmup + args.steps

    def reward_model() -> GPT2ForSequenceClassification:
        model = GPT2ForSequenceClassification.from_pretrained(args.rm, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    timer = StepTimer()
    common = {
        "output_dir": tempfile.mkdtemp(),
        "learning_rate": 1e-5,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    policy = AutoModelForCausalLM.from_pretrained(args.sft)
    if args.trainer == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[: steps * COMPLETIONS]]
        config = PPOConfig(
            per_device_train_batch_size=COMPLETIONS,
            num_mini_batches=1,
            local_rollout_forward_batch_size=COMPLETIONS,
            response_length=NEW_TOKENS,
            num_ppo_epochs=args.epochs,
            total_episodes=steps * COMPLETIONS,
            temperature=1.0,
            stop_token=None,
            num_sample_generations=0,
            kl_coef=0.05,
            **common,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=AutoModelForCausalLM.from_pretrained(args.sft),
            reward_model=reward_model(),
            value_model=reward_model(),
            train_dataset=Dataset.from_dict({"input_ids": ids}),
            callbacks=[timer],
        )
    else:
        group = {
            "per_device_train_batch_size": COMPLETIONS,
            "num_generations": GROUP,
            "max_completion_length": NEW_TOKENS,
            "generation_kwargs": {"min_new_tokens": NEW_TOKENS},
            "num_iterations": args.epochs,
            "max_steps": steps,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            **common,
        }
        data = Dataset.from_dict({"prompt": prompts[: steps * COMPLETIONS // GROUP * 2]})
        if args.trainer == "grpo":
            config, trainer_class, reward = (
                trl.GRPOConfig(beta=0.04, **group),
                trl.GRPOTrainer,
                reward_model(),
            )
        else:
            config, trainer_class, reward = trl.RLOOConfig(beta=0.05, **group), trl.RLOOTrainer, length_reward
        trainer = trainer_class(
            model=policy,
            reward_funcs=reward,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    trainer.train()
    per_step = [b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup :]
    print(
        json.dumps(
            {
                "trainer": args.trainer,
                "trl": trl.__version__,
                "epochs": args.epochs,
                "threads": torch.get_num_threads(),
                "steps": len(per_step),
                "median_s": statistics.median(per_step),
                "min_s": min(per_step),
                "max_s": max(per_step),
                "per_step_s": per_step,
            }
        )
    )


if __name__ == "__main__":
    main()
