"""`python -m experiments.export`: a run's models in Hugging Face format, for use outside the sandbox.

    python -m experiments.export RUN_OR_CHECKPOINT --out DIR [--artifacts CACHE]

RUN_OR_CHECKPOINT is a run folder (its latest complete checkpoint is exported) or one checkpoint
folder (``<run>/checkpoints/iter-N``). DIR gets

- ``actor/``: the trained policy and its tokenizer (``AutoModelForCausalLM``, ``AutoTokenizer``); a
  LoRA actor (``peft=lora_multi_adapter``) merged into the SFT weights;
- ``reward_model/``: the run's reward model, ``AutoModelForSequenceClassification`` (one label);
- ``critic/``: the trained critic, the same way, where the run has one.

The reward model and the SFT model are read from the run's artifact cache (``paths.artifacts`` of the
run's config, or ``--artifacts``), named in the run's ``summary.json``. How the value models map onto
the HF class, and what it cannot hold: ``backbone/export.py``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from backbone.artifacts import COMPLETE
from backbone.checkpoint import STATE_FILE, CheckpointManager
from backbone.export import causal_lm, sequence_classifier, value_model
from backbone.models import is_adapter, load_tokenizer, value_metadata
from backbone.validation import check_targets


@dataclass
class RunModels:
    """Where a run's trained models are: its checkpoint, and the stage artifacts it started from."""

    checkpoint: Path
    cfg: DictConfig
    sft: Path
    reward: Path
    has_critic: bool


def find_checkpoint(source: Path) -> Path:
    """``source`` itself when it is a checkpoint, else the latest complete one of the run folder."""
    if (source / STATE_FILE).exists():
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder")
    checkpoint = CheckpointManager(source / "checkpoints").latest()
    if checkpoint is None:
        raise FileNotFoundError(
            f"{source}: neither a checkpoint folder (no {STATE_FILE}) nor a run folder with a complete "
            f"checkpoint (no {source / 'checkpoints'}/iter-*/{STATE_FILE})"
        )
    return checkpoint


def locate(source: Path, artifacts: Path | None = None) -> RunModels:
    """The run's checkpoint, config and stage artifacts, each checked to be there."""
    checkpoint = find_checkpoint(source)
    cfg = OmegaConf.create(
        torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)["config"]
    )
    run_dir = checkpoint.parent.parent  # <run>/checkpoints/iter-N
    summary_path = run_dir / "summary.json"
    if checkpoint.parent.name != "checkpoints" or not summary_path.exists():
        raise FileNotFoundError(
            f"{checkpoint}: its run folder's summary.json ({summary_path}) is missing; it names the SFT and "
            "reward-model artifacts the run started from (export the checkpoint inside its run folder)"
        )
    names = json.loads(summary_path.read_text()).get("artifacts", {})
    root = Path(artifacts if artifacts is not None else cfg.paths.artifacts)
    paths = {}
    for stage in ("sft", "reward"):
        if stage not in names:
            raise ValueError(
                f"{summary_path}: no artifacts.{stage}; the run stopped before its stages were built"
            )
        paths[stage] = root / names[stage]
        if not (paths[stage] / COMPLETE).exists():
            raise FileNotFoundError(
                f"{paths[stage]}: the run's {stage} artifact is not there (the artifact cache is {root}; "
                "pass --artifacts with the folder the run's paths.artifacts named)"
            )
    return RunModels(checkpoint, cfg, paths["sft"], paths["reward"], (checkpoint / "critic").is_dir())


ROLES = ("actor", "reward_model", "critic")


def check_exportable(run: RunModels, roles: Sequence[str]) -> None:
    """Refuse, before anything is written, a value model the HF class would score differently."""
    pooling = value_metadata(run.reward)["pooling"]
    if "reward_model" in roles and pooling != "last":
        raise ValueError(
            f"{run.reward}: the reward model pools by {pooling!r} (reward.pooling), which "
            "AutoModelForSequenceClassification cannot reproduce (it reads the last token); not exported "
            "(--roles actor exports the policy alone)"
        )
    if "critic" in roles and run.has_critic:
        check_targets(run.cfg)  # the run's config builds only the sandbox's own classes
        if instantiate(run.cfg.algorithm).values_per != "token":
            raise ValueError(
                f"{run.checkpoint / 'critic'}: {run.cfg.algorithm.name} reads the critic's values averaged "
                "over each sequence, which AutoModelForSequenceClassification cannot reproduce (it reads the "
                "last token); not exported (--roles actor,reward_model leaves the critic out)"
            )


def export(
    source: Path, out: Path, artifacts: Path | None = None, roles: Sequence[str] = ROLES
) -> dict[str, Path]:
    """Writes ``out/actor``, ``out/reward_model`` and (where trained) ``out/critic``, of those in `roles`;
    returns them."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"--roles: {unknown} are not roles; choose from {list(ROLES)}")
    run = locate(Path(source), artifacts)
    check_exportable(run, roles)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; export into a new folder")
    model_cfg = run.cfg.model
    tokenizer = load_tokenizer(run.sft, model_cfg.trust_remote_code)
    actor_dir = run.checkpoint / "actor"
    base, adapter = (run.sft, actor_dir) if is_adapter(actor_dir) else (actor_dir, None)
    # every model is built (and each value model checked) before anything is written
    models = {"actor": (causal_lm(base, adapter, model_cfg), tokenizer)} if "actor" in roles else {}
    values = {"reward_model": run.reward} | ({"critic": run.checkpoint / "critic"} if run.has_critic else {})
    for role, path in values.items():
        if role not in roles:
            continue
        models[role] = sequence_classifier(value_model(path, run.sft, model_cfg), tokenizer, str(path))
    written = {}
    for role, (model, role_tokenizer) in models.items():
        written[role] = out / role
        model.save_pretrained(written[role])
        role_tokenizer.save_pretrained(written[role])
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a run folder or one of its checkpoints/iter-N folders")
    parser.add_argument("--out", type=Path, required=True, help="where actor/, reward_model/, critic/ go")
    parser.add_argument(
        "--artifacts", type=Path, help="the run's artifact cache (default: its paths.artifacts)"
    )
    parser.add_argument(
        "--roles",
        default=",".join(ROLES),
        help="comma-separated, of actor,reward_model,critic (default: all)",
    )
    args = parser.parse_args(argv)
    try:
        written = export(args.source, args.out, args.artifacts, args.roles.split(","))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    for role, path in written.items():
        print(f"{role}: {path}")
    return written


if __name__ == "__main__":
    main()
