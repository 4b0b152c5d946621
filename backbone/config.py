"""Structured configs: the schema every Hydra config group is validated against.

Each group's YAML (conf/<group>/<option>.yaml) extends one of the schemas stored here,
so a wrong type, an unknown key or a value outside a key's set of names (a ``Choice``) fails at
composition time with a message naming the key (and the names allowed). Nodes with a ``_target_``
are built with ``hydra.utils.instantiate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Choice(str, Enum):
    """A key's closed set of names. OmegaConf refuses any other value when the config is composed,
    naming the key and the allowed names. A member is its name and behaves as that string (equality,
    hashing, printing, JSON), so code compares it with plain strings; ``OmegaConf.to_container(...,
    enum_to_str=True)`` gives the plain strings a checkpoint or a YAML file stores."""

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list) -> str:
        return name

    __str__ = str.__str__
    __repr__ = str.__repr__
    __format__ = str.__format__


def choice(name: str, names: str, module: str = __name__) -> type[Choice]:
    """A ``Choice`` of the space-separated ``names``; ``module`` must be where it is defined, so that it
    can be imported by name (launchers pickle configs)."""
    return Choice(name, names, module=module)


# where the code that reads a key keeps its own list of names, tests/test_config.py holds the two equal
RowSchemaName = choice("RowSchemaName", "preference hh_rlhf rm_static shp stack_exchange_paired")
DType = choice("DType", "float32 bfloat16 float16")
StageInit = choice("StageInit", "sft base")
LogprobsSource = choice("LogprobsSource", "generate forward")
Pooling = choice("Pooling", "last mean")
NormalizeMode = choice("NormalizeMode", "none rm_stats running")
KLEstimator = choice("KLEstimator", "k1 k2 k3")
KLCoefUnits = choice("KLCoefUnits", "reward reward_std")
Scheduler = choice("Scheduler", "constant linear cosine")
CriticInit = choice("CriticInit", "reward reward_last reward_mean sft")
PeftMode = choice("PeftMode", "none lora_multi_adapter")
EngineName = choice("EngineName", "torch deepspeed")
Precision = choice("Precision", "fp32 bf16 fp16")
LoggerMode = choice("LoggerMode", "offline online disabled")
PTXSource = choice("PTXSource", "sft pretrain")
SeedScope = choice("SeedScope", "pipeline rl")
PinnedStage = choice("PinnedStage", "task sft reward_model")
Phase = choice("Phase", "evaluate tune stages")

# --------------------------------------------------------------------------- task


@dataclass
class ToyReviewsConfig:
    """The built-in synthetic task: a seeded review grammar with a known gold reward."""

    _target_: str = "backbone.tasks.toy_reviews.ToyReviews"
    name: str = "toy_reviews"
    seed: int = 0
    # SFT demonstrations (prompt, natural review) for train and held-out eval
    n_sft_train: int = 6000
    n_sft_eval: int = 400
    # preference pairs labelled from the gold reward by a Bradley-Terry draw
    n_pref_train: int = 6000
    n_pref_eval: int = 600
    # P(a preferred to b) = sigmoid((gold_a - gold_b) / bt_temperature); lower = cleaner labels
    bt_temperature: float = 0.5
    # prompts for the RL stage and held-out prompts for evaluation
    n_rl_prompts: int = 2000
    n_eval_prompts: int = 64
    # gold reward: clauses it counts (later ones are grammar errors), the tanh scale bounding the
    # sentiment term, and the word count past which LONG_PENALTY applies; more clauses and a larger
    # scale raise the ceiling (the run summary's data/gold_ceiling) and what RL must learn to reach it
    max_clauses: int = 2
    scale: float = 3.0
    max_words: int = 20
    # probability that a generated SFT demonstration / preference review goes on past 2 clauses
    # (to 3..max_clauses, still penalty-free; needs max_clauses > 2); 0 keeps 1-2 clause reviews
    sft_long_rate: float = 0.0
    pref_long_rate: float = 0.0


@dataclass
class PreferenceSourceConfig:
    """One preference dataset, read by ``datasets.load_dataset`` and mapped by its row schema."""

    # first argument of datasets.load_dataset: a hub id, a local folder, or a builder
    # ("json", "csv", "parquet")
    path: str = MISSING
    data_files: Any = None
    data_dir: str | None = None
    # how a row reads as (prompt, chosen, rejected), backbone/tasks/schemas.py: preference (the
    # three *_key columns) | hh_rlhf | rm_static | shp | stack_exchange_paired
    schema: RowSchemaName = RowSchemaName.preference
    train_split: str = "train"
    eval_split: str = "test"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    # read only the first max_rows rows of each split (a sample of a huge dataset); null: all
    max_rows: int | None = None


@dataclass
class PretrainCorpusConfig:
    """The pretraining corpus of PTX (ptx.source=pretrain): a text dataset, one document per row."""

    # load_dataset(path, config_name, data_files=..., data_dir=...): DeepSpeed-Chat's
    # --unsupervised_dataset_name wikitext --unsupervised_dataset_config_name wikitext-2-raw-v1;
    # null: the task has no pretraining corpus
    path: str | None = None
    config_name: str | None = None
    data_files: Any = None
    data_dir: str | None = None
    # the column holding one document per row; blank rows are skipped
    text_key: str = "text"
    # the texts PTX trains on, and the held-out ones whose loss is eval/pretrain_loss
    train_split: str = "train"
    eval_split: str = "test"
    # read only the first max_rows rows of each split; null: all
    max_rows: int | None = None


@dataclass
class PreferenceTaskConfig:
    """How a preference task gives its rows to the stages (backbone/tasks/blend.py)."""

    name: str = "preferences"
    # [sft, reward, rl] shares of each dataset's rows, disjoint (DeepSpeed-Chat's data_split 2,4,4);
    # null: every stage reads every row. RL prompts come from the train split's rl rows, eval
    # prompts from the eval split's
    stage_split: list[float] | None = None
    n_eval_prompts: int = 64
    seed: int = 0
    # every prompt is put through the model's template (LLaMA's BOS, say)
    prompt_template: str = "${oc.select:model.prompt_template,'{prompt}'}"
    # a pretraining corpus for PTX: task.pretrain.path=wikitext task.pretrain.config_name=wikitext-2-raw-v1
    pretrain: PretrainCorpusConfig = field(default_factory=PretrainCorpusConfig)


@dataclass
class PreferenceDatasetConfig(PreferenceTaskConfig, PreferenceSourceConfig):
    """A task over one preference dataset."""

    _target_: str = "backbone.tasks.preference.PreferenceDatasetTask"


@dataclass
class BlendSourceConfig(PreferenceSourceConfig):
    # share of the blend, relative to the other sources' weights
    weight: float = 1.0


@dataclass
class BlendConfig(PreferenceTaskConfig):
    """A task over several preference datasets, mixed by weight."""

    _target_: str = "backbone.tasks.preference.BlendedPreferenceTask"
    name: str = "blend"
    # source name -> dataset and weight
    sources: dict[str, BlendSourceConfig] = field(default_factory=dict)


# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Where the base model comes from: built locally (tiny) or loaded with ``from_pretrained``."""

    name: str = "tiny"
    # None: build a word-level tokenizer and a GPT-2-shaped model locally from the task's corpus
    name_or_path: str | None = None
    # architecture of a locally built model (ignored when name_or_path is set)
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 64
    dropout: float = 0.0
    # longest prompt + response the stages feed the model
    max_length: int = 64
    dtype: DType = DType.float32
    trust_remote_code: bool = False
    # what a preference task wraps every prompt in; "<s>{prompt}" starts LLaMA's prompts with BOS
    # (the code tokenises without special tokens). The tokenizer's pad token is EOS when it has none.
    prompt_template: str = "{prompt}"
    # recompute activations in backward, in the SFT and reward-model stages and in the RL update
    # (actor and critic; their dropout is then switched off in RL): memory for compute
    gradient_checkpointing: bool = False
    # the modules LoRA adapts in this architecture (gpt2: c_attn; gpt_neox: query_key_value; ...)
    lora_target_modules: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- stages


@dataclass
class SFTConfig:
    """Supervised fine-tuning on prompt + response, loss on response tokens only."""

    seed: int = 0
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 100
    # concatenate examples (each closed by its EOS) into blocks of model.max_length with no padding
    # (StackLLaMA); a batch is then batch_size blocks, so an epoch takes fewer steps
    packing: bool = False
    # train on the task's pretraining train texts too (every token scored), shuffled in with the
    # demonstrations: a tiny model fine-tuned from scratch then knows text that is not the task, as a
    # pretrained model does, and RL can drift away from it (eval/pretrain_loss, ptx.source=pretrain);
    # without it the SFT policy has never seen that text (the ptx row needs it)
    mix_pretrain: bool = False


@dataclass
class RewardModelConfig:
    """Pairwise reward-model training: -log sigmoid(r_chosen - r_rejected)."""

    seed: int = 0
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 100
    # start from the SFT model (as DeepSpeed-Chat and trlx do) or from the base model
    init: StageInit = StageInit.sft


# --------------------------------------------------------------------------- RL backbone knobs


@dataclass
class RolloutConfig:
    # budget units per iteration, the same for every algorithm so that equal iterations are equal
    # budgets: responses generated (prompts per iteration = samples_per_iteration / samples_per_prompt),
    # or preference pairs for a source that trains on the task's pairs (backbone/sources.py)
    samples_per_iteration: int = 64
    max_new_tokens: int = 24
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # where the sampling policy's log-probs come from: generate (the logits generation computed
    # anyway, equal to a forward pass up to float rounding) or forward (a separate pass, the
    # loss's own computation, so the first PPO ratio is exactly 1)
    logprobs: LogprobsSource = LogprobsSource.generate
    # evaluation on held-out prompts: every N iterations (and at iteration 0 and the last)
    eval_every: int = 5
    # evaluation every N samples consumed instead (a multiple of samples_per_iteration), so arms
    # with different batch sizes are evaluated at the same sample counts; null: eval_every
    eval_every_samples: int | None = None
    # sampled responses per held-out prompt in evaluation (greedy is always one); evaluation samples
    # with its own generator, seeded by (seed, samples consumed): every arm of a seed sees the same
    # sampling noise at the same point (common random numbers), and the run's RNG is not touched
    eval_samples: int = 4


@dataclass
class RewardConfig:
    # where the reward model reads its score: last non-pad token (trlx, DeepSpeed-Chat) or mean over response
    pooling: Pooling = Pooling.last
    # none | rm_stats (reward model's chosen-score mean/std) | running (running mean/std of RL scores)
    normalize: NormalizeMode = NormalizeMode.rm_stats
    # clip the normalised score to [-clip, clip]; null disables
    clip: float | None = 5.0
    # subtracted from the score of a response that ends without EOS; null disables
    missing_eos_penalty: float | None = None


@dataclass
class KLConfig:
    # per-token estimator used in the reward shaping: k1 | k2 | k3
    estimator: KLEstimator = KLEstimator.k1
    # initial (or fixed) coefficient beta
    coef: float = 0.05
    # what coef is measured in: reward (beta as it is, in the units of the shaped reward) or
    # reward_std (a fraction of the reward's spread: beta = coef x the std of a score in the reward's
    # units, so the penalty weighs the same against the reward whatever the normalisation)
    coef_units: KLCoefUnits = KLCoefUnits.reward
    # adaptive controller (Ziegler et al.): set a target KL to enable it
    target: float | None = None
    horizon: int = 10000


@dataclass
class OptimConfig:
    """AdamW shared by every algorithm; the learning rate itself is an algorithm hyperparameter."""

    # multiplies the algorithm's lr (and critic_lr): a relative learning-rate sweep across algorithms
    lr_scale: float = 1.0
    # learning rate of the critic; null = the algorithm's lr
    critic_lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # constant | cosine | linear, after warmup_steps of linear warm-up
    scheduler: Scheduler = Scheduler.constant
    warmup_steps: int = 0
    # a step whose loss or gradient is not finite is skipped (weights, optimiser and schedule
    # untouched) and counted; this many in a row stop the run with a checkpoint
    max_nonfinite_steps: int = 10


@dataclass
class CriticConfig:
    # where the critic starts: reward, a copy of the run's reward model (the seed's finding); reward_last
    # | reward_mean, a copy of the reward model trained with that pooling (the same stage and seed; the
    # reward itself keeps reward.pooling); sft, the SFT model's body under a fresh head
    init: CriticInit = CriticInit.reward


@dataclass
class PeftConfig:
    # none: separate full models | lora_multi_adapter: one base with LoRA adapters (backbone/lora.py)
    mode: PeftMode = PeftMode.none


@dataclass
class LoraMultiAdapterConfig(PeftConfig):
    """One base model, LoRA adapters actor, critic and reward; the reference is the base, adapters off."""

    mode: PeftMode = PeftMode.lora_multi_adapter
    # rank and scale (alpha / r) of every adapter
    r: int = 8
    alpha: int = 16
    # acts only where a model trains in train mode (the reward-model stage): the RL stack runs every
    # pass in eval mode, so that the first PPO ratio is 1 and the KL is 0 at step 0, whatever this is
    dropout: float = 0.0
    # the modules LoRA adapts; conf/peft/lora_multi_adapter.yaml reads them from model.lora_target_modules
    target_modules: list[str] = field(default_factory=list)


@dataclass
class EngineConfig:
    # torch: plain PyTorch, one process | deepspeed: actor and critic under one DeepSpeed engine,
    # launched with `deepspeed --num_gpus N --module experiments.run ...` (or torchrun)
    name: EngineName = EngineName.torch
    # cpu | cuda | auto (under a launcher: the rank's own GPU)
    device: str = "auto"
    # intra-op CPU threads per process: auto (the cores this process may use, shared out between the
    # jobs a parallel launcher runs at once and the ranks on this machine), a number, or 0 (torch's
    # default). Where processes share the cores (a sweep's jobs, local ranks) OpenMP threads sleep
    # when idle (experiments/__init__.py), so a busy core slows a job down instead of stalling it
    cpu_threads: Any = "auto"
    # deepspeed only: ZeRO stage 0-3, optimiser state (and, at stage 3, parameters) offloaded to CPU
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    # deepspeed only: fp32 | bf16 | fp16 (fp16 with dynamic loss scaling)
    precision: Precision = Precision.fp32
    # deepspeed only: a DeepSpeed JSON file merged over the config built from engine.* and optim.*, its
    # keys winning (objects merged key by key); the batch sizes, optimizer, scheduler and ZeRO stage
    # stay the sandbox's (backbone/engine.py)
    deepspeed_config: str | None = None


@dataclass
class LoggerConfig:
    # offline | online | disabled
    mode: LoggerMode = LoggerMode.offline
    project: str = "alignment-sandbox"
    entity: str | None = None
    # null: the sweep's name (multirun) or the run's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # log a table of prompt / response / reward / gold every N iterations (0 disables)
    table_every: int = 5


@dataclass
class PTXConfig:
    """Mixing a language-modelling loss into the RL loss (InstructGPT's PTX; DeepSpeed-Chat's
    unsupervised term), backbone/ptx.py."""

    # loss = algorithm loss + coef * LM loss on a minibatch of the source's train texts; 0 disables
    coef: float = 0.0
    # sft: the task's SFT train split (loss on responses) | pretrain: the task's pretraining corpus, text
    # that is not the RL objective (loss on every token; its held-out loss is logged as eval/pretrain_loss)
    source: PTXSource = PTXSource.sft
    batch_size: int = 16


@dataclass
class EMAConfig:
    """An exponential moving average of the actor's weights (DeepSpeed-Chat), evaluated beside them."""

    enabled: bool = False
    # theta_ema <- decay * theta_ema + (1 - decay) * theta after every optimiser step
    decay: float = 0.992


# --------------------------------------------------------------------------- the run


@dataclass
class FrontierConfig:
    """Best-of-n from the SFT policy, the reference curve of the gold-vs-KL frontier (backbone/best_of_n.py).

    Computed once per SFT/reward-model artifact pair (cached) and copied into the run folder as
    ``best_of_n.json``, when the task has a gold reward and the run has RL iterations (or is a tuned
    sweep's stage job)."""

    # samples per eval prompt, N; the curve is n = 1, 2, 4, ..., N; 0 disables
    best_of_n: int = 256
    # the seed of its sampling (its own stream: the run's RNG is untouched)
    seed: int = 0
    # responses generated per generate call: bounds the memory (a KV cache of this many sequences)
    chunk_size: int = 512
    # the first this many eval prompts; null: all of them
    prompts: int | None = None


@dataclass
class PathsConfig:
    # SFT and reward-model artifacts, keyed by the hash of the config that made them
    artifacts: str = "artifacts"


@dataclass
class RunConfig:
    task: Any = MISSING
    model: ModelConfig = MISSING
    algorithm: Any = MISSING
    rollout: RolloutConfig = MISSING
    reward: RewardConfig = MISSING
    kl: KLConfig = MISSING
    optim: OptimConfig = MISSING
    critic: CriticConfig = MISSING
    peft: PeftConfig = MISSING
    engine: EngineConfig = MISSING
    logger: LoggerConfig = MISSING
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ptx: PTXConfig = field(default_factory=PTXConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    seed: int = 0
    # pipeline: `seed` also seeds every stage before RL (the task's data draw, SFT init and order,
    # reward-model init and order; their own seed keys are overwritten), so seeds vary the whole
    # pipeline and each builds its own artifacts; rl: `seed` seeds RL only, the stages keep theirs
    seed_scope: SeedScope = SeedScope.pipeline
    # under pipeline, stages that keep their own seed on purpose (task | sft | reward_model)
    pinned_stages: list[PinnedStage] = field(default_factory=list)
    # evaluate: a run to compare; tune: a tuning-grid job of hydra/sweeper=tuned, which the report
    # reads only to show the grid (its seeds and configs are not the comparison's); stages: that
    # sweeper's job building one seed's SFT and reward model before the RL jobs
    phase: Phase = Phase.evaluate
    # RL iterations (collect -> prepare -> update); 0 stops after the reward model
    iterations: int = 60
    # a sample budget instead of iterations: total_samples / rollout.samples_per_iteration of them
    total_samples: int | None = None
    # checkpoint every N iterations (and at the end); the last `keep_checkpoints` are kept
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    # a run folder to continue from its last complete checkpoint, as it was configured (a run
    # started again in its own folder, with the same config, resumes without it)
    resume: str | None = None


def register_configs() -> None:
    """Store the schemas; each conf/<group>/<option>.yaml names its schema in its defaults list."""
    # `${if_null:${resume},outputs/...}`: the run folder is the resumed one when there is one
    OmegaConf.register_new_resolver(
        "if_null", lambda value, default: default if value is None else value, replace=True
    )
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    groups = {
        "task": {
            "toy_reviews_schema": ToyReviewsConfig,
            "preference_dataset_schema": PreferenceDatasetConfig,
            "preference_blend_schema": BlendConfig,
        },
        "model": {"model_schema": ModelConfig},
        "rollout": {"rollout_schema": RolloutConfig},
        "reward": {"reward_schema": RewardConfig},
        "kl": {"kl_schema": KLConfig},
        "optim": {"optim_schema": OptimConfig},
        "critic": {"critic_schema": CriticConfig},
        "peft": {"peft_schema": PeftConfig, "lora_multi_adapter_schema": LoraMultiAdapterConfig},
        "engine": {"engine_schema": EngineConfig},
        "logger": {"logger_schema": LoggerConfig},
    }
    for group, schemas in groups.items():
        for name, node in schemas.items():
            cs.store(group=group, name=name, node=node)
    # every registered algorithm's schema is the option algorithm=<name> itself, with its defaults
    from algorithms import REGISTRY  # algorithms import the backbone: registered once both are loaded

    for name, algorithm in REGISTRY.items():
        cs.store(group="algorithm", name=name, node=algorithm.Config)
