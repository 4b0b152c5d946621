"""One job of ``experiments.run``: SFT -> reward model -> RL, with its run record and W&B.

Imported by ``experiments.run``'s ``main`` when a job starts, not when that module loads: a sweep's
launcher process composes configs and hands jobs to its workers without importing transformers,
DeepSpeed and the analysis (``import experiments.run`` 6.1 -> 2.5 s on 2 cores, time in which no
worker has started; torch still loads, with the algorithms' config schemas).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from analysis.run_summary import COLUMNS, format_table, summary_rows
from backbone import distributed
from backbone.best_of_n import write_best_of_n
from backbone.build import build_collector, build_trainer, count_truncated_prompts
from backbone.checkpoint import CheckpointManager, config_changes, is_mutable_on_resume, load_state
from backbone.engine import configure_cpu, cpu_threads, resolve_device
from backbone.provenance import environment
from backbone.ptx import pretrain_texts
from backbone.rng import apply_seed_scope, seed_everything
from backbone.stages import METRICS_FILE, Log, StageBuild, StageLog, prepare_stages
from backbone.tasks.base import SPLITS
from backbone.timing import PhaseTimer
from backbone.tracking import Tracker
from backbone.trainer import Preempted, planned_iterations
from backbone.validation import check_run_config, check_targets

log = logging.getLogger("experiments.run")


# overrides that say where or how a job runs and reports, not what it trains: in no run's name or tags
BOOKKEEPING = (
    "hydra.",
    "paths.",
    "logger.",
    "resume",
    "phase",
    "experiment",
    "engine.device",
    "engine.cpu_threads",
)
# the W&B job type of each stage's run, by artifact kind; RL runs' job type is their algorithm
STAGE_JOB_TYPES = {"sft": "sft", "reward": "reward_model"}
ARTIFACT_TYPE = "model"


def named_overrides(hydra_cfg: DictConfig) -> list[str]:
    """The job's overrides that say what it trains, sorted, less those its sweep gives every job alike
    (single values on the sweep's command line, saved in its multirun.yaml, or in its sweeper's
    ``params``: an experiment's task and budget): in a sweep, the values that tell its jobs apart."""
    parser = OverridesParser.create()
    common = [
        f"{key}={value}" for key, value in (OmegaConf.select(hydra_cfg, "sweeper.params") or {}).items()
    ]
    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if hydra_cfg.mode == RunMode.MULTIRUN and saved.exists():
        common += OmegaConf.load(saved).hydra.overrides.task
    fixed = {o.key_or_group for o in parser.parse_overrides(common) if not o.is_sweep_override()}
    return sorted(
        o.input_line
        for o in parser.parse_overrides(list(hydra_cfg.overrides.task))
        if not o.key_or_group.startswith(BOOKKEEPING) and o.key_or_group not in fixed
    )


def run_identity(cfg: DictConfig) -> tuple[str, str, list[str]]:
    """(group, name, tags): a sweep's jobs share the sweep's group (its folder's name, e.g.
    ``three_algorithms_2026-11-24_18-00-00`` for an experiment); a run is named after the values it was
    given, as Hydra's ``override_dirname`` writes them (``algorithm=rrhf,seed=1``; with none,
    ``ppo_gae-seed0``), and a sweep's jobs are tagged with them."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = named_overrides(hydra_cfg)
    name = ",".join(overrides) or f"{cfg.algorithm.name}-seed{cfg.seed}"
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir)
        default_group = f"{sweep_dir.parent.name}_{sweep_dir.name}"
        knob_tags = overrides
    else:
        default_group = f"{output_dir.parent.name}_{output_dir.name}"
        knob_tags = []
    tags = [*cfg.logger.tags, cfg.algorithm.name, cfg.task.name, cfg.model.name, *knob_tags]
    return cfg.logger.group or default_group, name, tags


def stage_runs(cfg: DictConfig, run_dir: Path, group: str) -> StageLog:
    """Each stage this job builds as a W&B run of its own, in the job's group and W&B folder: job type
    ``sft`` or ``reward_model``, named after its artifact folder, configured by the artifact's key, its
    local record in ``<run_dir>/stages/<artifact>/``. It uses the artifacts it starts from; once its
    folder is in place, it logs the artifact and takes the stage's metrics as its summary."""

    @contextmanager
    def record(build: StageBuild) -> Iterator[Log]:
        with Tracker(
            run_dir / "stages" / build.folder.name,
            enabled=distributed.is_main(),
            mode=cfg.logger.mode,
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=group,
            job_type=STAGE_JOB_TYPES[build.kind],
            name=build.folder.name,
            tags=[*cfg.logger.tags, cfg.task.name, cfg.model.name],
            config=build.key,
            wandb_dir=run_dir,
            reinit="create_new",  # beside the job's own run, which stays open
        ) as stage:
            for folder in build.inputs:
                stage.use_artifact(folder, ARTIFACT_TYPE)
            yield stage.log
            stage.log_artifact(build.folder, ARTIFACT_TYPE)
            stage.summary(json.loads((build.folder / METRICS_FILE).read_text()))

    return record


def resume_point(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, Path | None, dict | None]:
    """The config to run, and the checkpoint (with its state) to continue from, if any.

    A folder that holds a complete checkpoint is continued: started again with the same
    command (auto-resume, also how a re-run sweep continues its jobs), the config must equal
    the checkpoint's; with ``resume=<folder>`` the checkpoint's own config is used, and only
    where and how the run reports (logger, paths, checkpoint cadence) may be overridden.
    """
    checkpoint = CheckpointManager(run_dir / "checkpoints").latest()
    if cfg.resume is not None:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise ValueError("resume=<run folder> is for one run; run a sweep again in its hydra.sweep.dir")
        if Path(cfg.resume).resolve() != run_dir.resolve():
            raise ValueError(f"resume={cfg.resume}, but hydra.run.dir points the run at {run_dir}")
        if checkpoint is None:
            raise FileNotFoundError(
                f"resume={cfg.resume}: no complete checkpoint in {run_dir / 'checkpoints'} (the run stopped "
                f"before its first one); start the run anew"
            )
    if checkpoint is None:
        return cfg, None, None
    state = load_state(checkpoint)
    current = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if cfg.resume is None:
        changes = config_changes(state["config"], current)
        if changes:
            raise ValueError(
                f"{run_dir} holds a run with another config ({'; '.join(changes[:5])}). Use a new folder, or "
                f"resume={run_dir} to continue that run as it was configured."
            )
        return cfg, checkpoint, state
    # an override may repeat the run's own value (the same command with resume= added); only a value
    # that differs from the checkpoint's is a change
    overridden = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    changes = config_changes(state["config"], current, under=overridden)
    if changes:
        raise ValueError(
            f"resume={cfg.resume} continues the run as it was configured; {'; '.join(changes)}: cannot "
            f"change (start a new run for that)"
        )
    resumed, current = OmegaConf.create(state["config"]), OmegaConf.create(current)
    for key in filter(is_mutable_on_resume, overridden):
        OmegaConf.update(resumed, key, OmegaConf.select(current, key), force_add=True)
    return resumed, checkpoint, state


def parallel_jobs() -> int:
    """Jobs the launcher runs at once: a parallel launcher's ``n_jobs`` (joblib's -1: one per core)."""
    n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=1)
    return len(os.sched_getaffinity(0)) if n_jobs < 0 else n_jobs


def job_times(timer: PhaseTimer, started: float) -> dict[str, float]:
    """This process's seconds in the job (``time/job_s``) and in its big phases (``time/stages_s``,
    ``time/best_of_n_s``, ``time/rl_s``): what a sweep's jobs spend besides training
    (``experiments.benchmark sweep`` reads them)."""
    return {**timer.pop(), "time/job_s": time.perf_counter() - started}


def train(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # one progress bar per stage is ours
    cfg, checkpoint, state = resume_point(apply_seed_scope(cfg), run_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.engine.device)
    configure_cpu(device, cpu_threads(cfg.engine.cpu_threads, parallel_jobs()))
    # settings first (bad hyperparameters fail in the algorithm's constructor), then the data
    check_targets(cfg)
    algorithm = instantiate(cfg.algorithm)
    check_run_config(cfg, algorithm)
    task = instantiate(cfg.task)
    if cfg.ptx.source == "pretrain" or cfg.sft.mix_pretrain:  # without the texts, fail before the stages
        for split in SPLITS:
            pretrain_texts(task, split)
    group, name, tags = run_identity(cfg)
    if state is not None and (run_dir / "summary.json").exists():  # resumed: its name, however started
        name = json.loads((run_dir / "summary.json").read_text()).get("name", name)
    tracker = Tracker(
        run_dir,
        enabled=distributed.is_main(),
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=group,
        job_type=cfg.algorithm.name,
        name=name,
        tags=tags,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        resume_id=state["wandb_run_id"] if state else None,
    )
    with tracker:
        # rows after the checkpoint are done again (all of them, when a run stopped before its first
        # checkpoint starts anew): none is lost or doubled, here or in W&B
        tracker.rewind("iteration", state["iteration"] if state else -1)
        if state is not None:
            log.info("resuming %s from %s (iteration %d)", run_dir, checkpoint, state["iteration"])
        identity = {"group": group, "name": name, "run_id": tracker.run_id, "data": task.data_stats()}
        # wall-clock is only comparable at equal threads
        tracker.summary(
            {**identity, "cpu_threads": torch.get_num_threads(), "environment": environment(device)}
        )
        timer = PhaseTimer(device)
        with timer.phase("stages"):
            stages = prepare_stages(cfg, task, stage_runs(cfg, run_dir, group))
        used = {"sft": Path(stages.sft), "reward": Path(stages.reward)}
        if algorithm.needs_critic:
            used["critic"] = Path(stages.critic)  # where the critic starts
        for folder in dict.fromkeys(used.values()):  # every run records its inputs, built here or cached
            tracker.use_artifact(folder, ARTIFACT_TYPE)
        artifacts = {role: folder.name for role, folder in used.items()}
        tracker.summary(
            {"sft": stages.sft_metrics, "reward_model": stages.rm_metrics, "artifacts": artifacts}
        )
        # the frontier's reference curve: best_of_n.json in the run folder, cached per SFT and reward
        # model, its own RNG stream; a reference, not a history row. A tuned sweep's stage jobs build it
        # before the RL jobs that share it
        rl = planned_iterations(cfg) > 0
        if task.has_gold and cfg.frontier.best_of_n > 0 and (rl or cfg.phase == "stages"):
            with timer.phase("best_of_n"):
                write_best_of_n(cfg, task, stages, device, run_dir)
        summary = {}
        if rl:
            # the RL stream (and any freshly initialised head or adapter) does not depend on whether
            # the stages were built in this process or read from the cache
            seed_everything(cfg.seed)
            collector = build_collector(cfg, task, algorithm, stages, device)
            truncated = count_truncated_prompts(task, collector)
            trainer = build_trainer(cfg, task, algorithm, collector, tracker, run_dir)
            if state is not None:
                trainer.load_state(state, checkpoint)
            try:
                with timer.phase("rl"):
                    summary = trainer.run()
                summary.update(
                    seed=cfg.seed, task=task.name, model=cfg.model.name, prompts_truncated=truncated
                )
            except Preempted:
                tracker.mark_preempting()
                raise
        tracker.summary({**summary, **job_times(timer, started)})
        if distributed.is_main():
            report_end_of_run(tracker, run_dir)
        return summary


def report_end_of_run(tracker: Tracker, run_dir: Path) -> None:
    """The run's headline numbers, read back from its record: to the job's log (Hydra sends it to
    stdout and run.log) and to the W&B run summary."""
    rows = summary_rows(run_dir)
    log.info("end of run (final = the last evaluation):\n%s", format_table(rows))
    tracker.summary_table("end_of_run", list(COLUMNS), [list(row) for row in rows])


def record_failure(run_dir: Path, error: BaseException) -> None:
    """``failure.json`` in the job's folder: what failed, where, and the job's overrides."""
    failure = {
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(),
        "overrides": list(HydraConfig.get().overrides.task),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failure.json").write_text(json.dumps(failure, indent=2))


def run_job(cfg: DictConfig) -> float | None:
    """The job: train, record a failure, and return the score a tuning sweeper reads."""
    if cfg.engine.name == "deepspeed":
        import deepspeed

        deepspeed.init_distributed()  # the launcher's (or torchrun's) RANK / WORLD_SIZE
    # every rank writes into rank 0's folder (each rank's Hydra may stamp its own time)
    run_dir = Path(distributed.broadcast(HydraConfig.get().runtime.output_dir))
    try:
        summary = train(cfg, run_dir)
    except Preempted as stop:
        log.warning("%s; run the same command again (or resume=%s) to continue", stop, run_dir)
        raise SystemExit(128 + signal.SIGTERM) from stop
    except Exception as error:
        # recorded, then re-raised: Hydra's launchers still run the sweep's other jobs and the
        # sweep exits non-zero
        if distributed.is_main():
            record_failure(run_dir, error)
        raise
    if distributed.is_main():
        log.info("run record: %s", run_dir.resolve())
        print(f"run record: {run_dir.resolve()}")
    # returned to Hydra sweepers that optimise a metric: the gold gain over the budget where the task
    # has a gold reward (tuning on the proxy would pick the arm that hacks it best), else the proxy's
    return summary.get("auc_gain/eval/gold_mean", summary.get("auc_gain/eval/reward_mean"))
