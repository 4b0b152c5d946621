"""Run records (local sweep folders or a W&B group) as two pandas frames: `runs` and `history`.

A job folder is a folder holding any of `.hydra/config.yaml`, `history.jsonl`, `summary.json` or
`failure.json` (the Hydra output folder of one job of `python -m experiments.run`). Both sources go
through one conversion, `frames_from_records`, from (config dict, summary dict, history rows):

- `runs`: one row per job. `run` (an id unique in the frame: the job folder, or the W&B run id),
  `path`, `source` (the sweep folder or `wandb:ENTITY/PROJECT/GROUP`), `status`, `error`,
  `algorithm`, `seed`, `group`, `name`, `budget_unit`; every scalar config knob as a dotted column
  (`algorithm.lr`, `kl.coef`, `optim.eps`, ...; a list knob as its JSON text); the summary's scalars
  under their own slash names (`final/eval/reward_mean`, `wall_time_s`, and the nested stage
  metrics lifted to `sft/eval_loss`, `rm/eval_accuracy`, ...). Config knobs are therefore exactly
  the columns with a dot (`knob_columns`).
- `history`: the RL rows (those with an `iteration`) of every job, with a `run` column, one per (run,
  iteration): where a W&B run holds an iteration twice (a resume with an older sandbox logged the
  iterations between its checkpoint and the kill again), the later row, the one the run record kept.
  A stage row (`sft/step`, `rm/step`) is dropped. JSON `null` (a non-finite value) reads as NaN.
  A W&B group's stage runs (job type `sft`, `reward_model`) are no jobs: the loader leaves them out.

The budget axis. Every comparison reads its runs against `budget` (`BUDGET`), the budget units the
updates have consumed (iteration x rollout.samples_per_iteration), not `samples` (responses generated:
an offline buffer is generated up front, preference pairs not at all). Its unit is the run's
`budget_unit` in `runs` (summary.json: `samples`, or `pairs` for an algorithm trained on the task's
preference pairs). Records written before the trainer logged them have neither: `with_budget` derives
the column here, once, for every loader (iteration x the config's rollout.samples_per_iteration, the
trainer's own definition, or `samples` where the config lacks it), and the unit is `samples`, the only
one there was. `budget_label` names the axis with its unit(s).

Status: `failed` when the job left a `failure.json` (W&B: state failed or crashed); `ok` when its
summary holds the end-of-run values (`wall_time_s`; or a stages-only run, `iterations=0`);
`incomplete` otherwise: still running, killed, or failed before failure records existed.

Benchmark results (`memory*.json`) found under the same paths are read by `load_benchmarks`; a job's
best-of-n reference curve (`best_of_n.json`, local records only) goes into `Records.best_of_n`, one
row per (run, n), by `best_of_n_frame`.
Nothing here imports torch or any project module: analysis reads files only.
"""

from __future__ import annotations

import glob
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

JOB_FILES = (".hydra/config.yaml", "history.jsonl", "summary.json", "failure.json")
# the x axis of every comparison: budget units consumed (history), in the run's `budget_unit` (runs)
BUDGET = "budget"
BUDGET_UNIT = "budget_unit"
DEFAULT_UNIT = "samples"  # the unit of every record written before units were recorded
# RL counters: a W&B history row with nothing besides these (a table's own row) carries no metric
COUNTERS = ("iteration", BUDGET, "samples", "tokens", "optimizer_steps", "tokens_trained", "time/elapsed_s")
# config columns that say where or how a job ran, or how often it is measured, not what it trains;
# they never separate the runs of a comparison (`iterations` is handled by comparing at equal budget)
BOOKKEEPING = (
    "seed",
    "iterations",
    "resume",
    "checkpoint_every",
    "paths.",
    "logger.",
    "engine.device",
    "rollout.eval_every",
    "rollout.eval_every_samples",
    "rollout.eval_samples",
)
META_COLUMNS = ("run", "path", "source", "status", "error", "algorithm", "seed", "group", "name", BUDGET_UNIT)
BEST_OF_N_COLUMNS = ("run", "artifact", "n", "kl", "sqrt_kl", "gold_mean", "reward_mean")


@dataclass
class RunRecord:
    """One job's record as read from its folder or from W&B, before conversion to frames."""

    run: str
    path: str
    source: str
    config: Mapping[str, Any] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)
    history: Sequence[Mapping[str, Any]] = ()
    # why the job failed (the last line of its traceback), None when no failure was recorded
    failure: str | None = None
    # the job's best-of-n reference curve (`best_of_n.json`): the file's content, empty when absent
    best_of_n: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Records:
    """The two frames of a set of runs, where they came from, and any benchmark results beside them."""

    runs: pd.DataFrame
    history: pd.DataFrame
    source: str
    benchmarks: list[dict] = field(default_factory=list)
    # best-of-n reference curves, one row per (run, n): `best_of_n_frame`
    best_of_n: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(BEST_OF_N_COLUMNS)))


# --------------------------------------------------------------------------- conversion


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to dotted scalar keys; a list becomes its JSON text so runs can be grouped by it."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if not prefix and str(key).startswith("_"):
            continue  # W&B's own entries (`_wandb`) at the top level
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        elif _is_scalar(value):
            flat[name] = value
    return flat


def flatten_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Summary scalars under their own names; a nested dict's keys are lifted (`sft/eval_loss`) because
    the stage metrics are already namespaced, other nested keys are joined with a slash."""
    flat: dict[str, Any] = {}
    for key, value in summary.items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, Mapping):
            for inner, inner_value in flatten_summary(value).items():
                flat[inner if "/" in inner else f"{key}/{inner}"] = inner_value
        elif _is_scalar(value):
            flat[key] = value
    return flat


def run_status(config: Mapping[str, Any], summary: Mapping[str, Any], failure: str | None) -> str:
    if failure is not None:
        return "failed"
    if "wall_time_s" in summary or (config.get("iterations") == 0 and "reward_model" in summary):
        return "ok"
    return "incomplete"


def with_budget(rows: Iterable[Mapping[str, Any]], config: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """A run's RL rows, each with its `budget`: as logged, or, for a record written before the trainer
    logged it, iteration x the run config's rollout.samples_per_iteration (what the trainer counts;
    `samples` would not do for an offline buffer, whose samples jump to the whole budget at iteration
    1), else `samples` (a record without that knob). The one place the axis of older records is made."""
    rollout = config.get("rollout")
    per_iteration = rollout.get("samples_per_iteration") if isinstance(rollout, Mapping) else None
    if isinstance(per_iteration, bool) or not isinstance(per_iteration, (int, float)):
        per_iteration = None  # absent, or an interpolation left unresolved
    for row in rows:
        row = dict(row)
        if row.get(BUDGET) is None:
            if per_iteration is not None:
                row[BUDGET] = row["iteration"] * per_iteration
            elif row.get("samples") is not None:
                row[BUDGET] = row["samples"]
        yield row


def _rl_rows(record: RunRecord) -> Iterator[dict[str, Any]]:
    rows = []
    for row in record.history:
        if row.get("iteration") is None:
            continue  # SFT / reward-model stage rows
        clean = {k: v for k, v in row.items() if not str(k).startswith("_") and _is_scalar(v)}
        if any(k not in COUNTERS for k in clean):
            rows.append({"run": record.run, **clean})
    return with_budget(rows, record.config)


def frames_from_records(records: Iterable[RunRecord]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `runs` and `history` frames of some run records (the one conversion both loaders use)."""
    run_rows, history_rows = [], []
    for record in records:
        config = flatten_config(record.config)
        summary = flatten_summary(record.summary)
        status = run_status(record.config, record.summary, record.failure)
        meta = {
            "run": record.run,
            "path": record.path,
            "source": record.source,
            "status": status,
            "error": record.failure
            or ("" if status == "ok" else "no end-of-run summary: running, killed, or failed unrecorded"),
            "algorithm": config.get("algorithm.name", summary.get("algorithm")),
            "seed": record.config.get("seed", summary.get("seed")),
            "group": summary.get("group"),
            "name": summary.get("name"),
            BUDGET_UNIT: summary.get(BUDGET_UNIT) or DEFAULT_UNIT,
        }
        # the config wins over the summary for the knobs both hold (seed, iterations)
        run_rows.append({**summary, **config, **meta})
        history_rows.extend(_rl_rows(record))
    runs = pd.DataFrame(run_rows, columns=None if run_rows else list(META_COLUMNS))
    history = pd.DataFrame(history_rows, columns=None if history_rows else ["run", *COUNTERS])
    if not history.empty:
        history = history.drop_duplicates(["run", "iteration"], keep="last")
        history = history.sort_values(["run", "iteration"], kind="stable").reset_index(drop=True)
    return runs, history


def best_of_n_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """The best-of-n curves of some run records, one row per (run, n): `BEST_OF_N_COLUMNS`. `artifact`
    names the cached curve (runs that share an SFT and reward model share it)."""
    rows = [
        {"run": record.run, "artifact": record.best_of_n.get("artifact", record.run), **row}
        for record in records
        for row in record.best_of_n.get("rows", [])
    ]
    frame = pd.DataFrame(rows, columns=list(BEST_OF_N_COLUMNS))
    return frame.astype({c: float for c in BEST_OF_N_COLUMNS[3:]})


def knob_columns(runs: pd.DataFrame) -> list[str]:
    """The config knobs among the columns of `runs` (the dotted ones)."""
    return [c for c in runs.columns if "." in c]


def _is_bookkeeping(column: str) -> bool:
    return any(column == b or (b.endswith(".") and column.startswith(b)) for b in BOOKKEEPING)


def value_key(value: Any) -> Any:
    """A knob value usable as a dict key: None for a missing one (None or NaN, which is unequal to itself)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def row_keys(runs: pd.DataFrame, columns: Sequence[str]) -> list[tuple]:
    """Each row's values of `columns` as a dict key; an empty tuple per row for no columns (a frame
    without columns has no rows to `itertuples` before pandas 3)."""
    if not columns:
        return [()] * len(runs)
    return [tuple(map(value_key, key)) for key in runs[list(columns)].itertuples(index=False, name=None)]


def _determined_by(runs: pd.DataFrame, column: str, by: list[str]) -> bool:
    """True when `column` takes one value within every combination of the `by` columns."""
    groups: dict[tuple, Any] = {}
    for key, value in zip(row_keys(runs, by), runs[column]):
        if groups.setdefault(key, value_key(value)) != value_key(value):
            return False
    return True


def swept_knobs(runs: pd.DataFrame, exclude: Iterable[str] = ()) -> list[str]:
    """The knobs that vary across `runs` and are not determined by another swept knob.

    Bookkeeping columns and `exclude` are left out. `algorithm.name` comes first, so the hyperparameters
    an algorithm only differs in because it is another algorithm (its default `lr`, `_target_`, ...)
    collapse into it, while a knob swept within an algorithm (`algorithm.lr` of a tuning sweep) stays.
    """
    excluded = set(exclude)
    varying = [
        c
        for c in knob_columns(runs)
        if c not in excluded and not _is_bookkeeping(c) and runs[c].astype(str).nunique() > 1
    ]
    varying.sort(key=lambda c: (c != "algorithm.name", c))
    kept: list[str] = []
    for column in varying:
        if not kept or not _determined_by(runs, column, kept):
            kept.append(column)
    return kept


def sort_key(value: Any) -> tuple:
    """Order knob values: numbers numerically, then text, missing last; tuples element by element."""
    if isinstance(value, tuple):
        return tuple(sort_key(v) for v in value)
    if value_key(value) is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def series(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Series label -> run ids: one series per combination of the algorithm and the other swept knobs
    (labels like `ppo_gae, lr=3e-05`), the unit that figures and tables aggregate seeds over."""
    knobs = ["algorithm.name", *(k for k in swept_knobs(runs) if k != "algorithm.name")]
    # records without a config still name their algorithm in the summary
    knobs = [k for k in knobs if k in runs.columns] or ["algorithm"]
    groups: dict[tuple, list[str]] = {}
    for _, run in runs.iterrows():
        groups.setdefault(tuple(value_key(run[k]) for k in knobs), []).append(str(run["run"]))

    def label(values: tuple) -> str:
        # a knob a run does not have (another algorithm's hyperparameter) is left out of its label
        return ", ".join(
            str(v) if k in ("algorithm.name", "algorithm") else f"{k.rsplit('.', 1)[-1]}={v}"
            for k, v in zip(knobs, values)
            if v is not None
        )

    return {label(values): groups[values] for values in sorted(groups, key=sort_key)}


def units_of(runs: pd.DataFrame) -> dict[str, str]:
    """Run id -> its budget unit (`DEFAULT_UNIT` where the frame or the record has none)."""
    units = runs[BUDGET_UNIT] if BUDGET_UNIT in runs.columns else pd.Series(None, index=runs.index)
    return {str(r): str(u) if value_key(u) is not None else DEFAULT_UNIT for r, u in zip(runs["run"], units)}


def unit_label(units: Mapping[str, str]) -> str:
    """The unit(s) of a budget axis from the unit of each of its names (series, knob values): the one
    unit, or with several the commonest (samples on a tie) and each other one with the names in it,
    `samples; pairs for [dpo, mode=offline]`. Names whose runs mix units are listed under each."""
    by_unit: dict[str, list[str]] = {}
    for name, unit in units.items():
        for part in unit.split("/"):
            by_unit.setdefault(part, []).append(name)
    if len(by_unit) <= 1:
        return next(iter(by_unit), DEFAULT_UNIT)
    counts = Counter({unit: len(names) for unit, names in by_unit.items()})
    first, *others = sorted(counts, key=lambda u: (-counts[u], u != DEFAULT_UNIT, u))
    return "; ".join([first, *(f"{u} for " + ", ".join(f"[{n}]" for n in by_unit[u]) for u in others)])


def series_units(runs: pd.DataFrame) -> dict[str, str]:
    """Series label (`series`) -> the budget unit of its runs, '/'-joined when they differ."""
    units = units_of(runs)
    return {label: "/".join(sorted({units[r] for r in run_ids})) for label, run_ids in series(runs).items()}


def mixed_units(runs: pd.DataFrame) -> bool:
    """True when the runs' budgets are in more than one unit (e.g. samples beside preference pairs)."""
    return len(set(units_of(runs).values())) > 1


def budget_label(runs: pd.DataFrame) -> str:
    """The budget axis named with its unit(s): `budget (samples)`, or for runs in several units
    `budget (samples; pairs for [dpo, mode=offline])`."""
    return f"budget ({unit_label(series_units(runs))})"


# --------------------------------------------------------------------------- local records


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_history(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of a job killed while writing it
    return rows


def _read_config(job: Path) -> dict:
    path = job / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf  # torch-free; parses Hydra's resolved config as written

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _failure_reason(job: Path) -> str | None:
    path = job / "failure.json"
    if not path.exists():
        return None
    failure = _read_json(path)
    for key in ("error", "message", "exception"):
        if failure.get(key):
            return str(failure[key])
    lines = [line for line in str(failure.get("traceback", "")).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "failure.json (no message)"


def _is_job(folder: Path) -> bool:
    return any((folder / name).exists() for name in JOB_FILES)


def _jobs_under(folder: Path) -> Iterator[Path]:
    if _is_job(folder):
        yield folder
        return
    for child in sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name)):
        if child.is_dir() and not child.name.startswith("."):
            yield from _jobs_under(child)


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    expanded = []
    for path in map(str, paths):
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches or not Path(matches[0]).exists():
            raise FileNotFoundError(f"no such run record path: {path}")
        expanded.extend(Path(m) for m in matches)
    return expanded


def job_folders(paths: Iterable[str | Path]) -> list[Path]:
    """Every job folder at or under `paths` (sweep folders, job folders or glob patterns), each once."""
    jobs: dict[Path, None] = {}
    for path in _expand(paths):
        if path.is_dir():
            jobs.update(dict.fromkeys(p.resolve() for p in _jobs_under(path)))
    return list(jobs)


def read_job(job: Path) -> RunRecord:
    return RunRecord(
        run=str(job),
        path=str(job),
        source=str(job.parent),
        config=_read_config(job),
        summary=_read_json(job / "summary.json"),
        history=_read_history(job / "history.jsonl"),
        failure=_failure_reason(job),
        best_of_n=_read_json(job / "best_of_n.json"),
    )


def load_benchmarks(paths: Iterable[str | Path]) -> list[dict]:
    """The `memory*.json` benchmark results at or under `paths`, each with its `path` added."""
    results = []
    for path in _expand(paths):
        files = [path] if path.is_file() else sorted(path.rglob("memory*.json"))
        for file in files:
            if file.name.startswith("memory") and file.suffix == ".json":
                results.append({**_read_json(file), "path": str(file)})
    return results


def load_local(paths: Sequence[str | Path]) -> Records:
    """Read every job folder at or under `paths`; FileNotFoundError for a path that does not exist."""
    records = [read_job(job) for job in job_folders(paths)]
    runs, history = frames_from_records(records)
    return Records(
        runs,
        history,
        source=", ".join(map(str, paths)),
        benchmarks=load_benchmarks(paths),
        best_of_n=best_of_n_frame(records),
    )


# --------------------------------------------------------------------------- W&B

WANDB_FAILED_STATES = ("failed", "crashed")
# the job types of the runs that build the SFT and reward-model artifacts (experiments.run.STAGE_JOB_TYPES)
WANDB_STAGE_JOB_TYPES = ("sft", "reward_model")


def wandb_record(run: Any, source: str) -> RunRecord:
    """One W&B public-API run (`wandb.apis.public.Run`) as a run record."""
    # HTTPSummary keeps the plain values in _json_dict; iterating it fetches nested objects one by one
    summary = getattr(run.summary, "_json_dict", None)
    if summary is None:
        summary = dict(run.summary)
    state = getattr(run, "state", "")
    return RunRecord(
        run=run.id,
        path=getattr(run, "url", run.id),
        source=source,
        config=dict(run.config),
        summary=summary,
        history=list(run.scan_history()),
        failure=f"W&B run state: {state}" if state in WANDB_FAILED_STATES else None,
    )


def load_wandb(entity_project: str, group: str, api: Any = None) -> Records:
    """The runs of one W&B group (`entity/project`, `group`); `api` defaults to `wandb.Api()`."""
    if api is None:
        import wandb  # lazy: only this loader needs it

        api = wandb.Api()
    source = f"wandb:{entity_project}/{group}"
    runs = api.runs(entity_project, filters={"group": group})
    records = [wandb_record(run, source) for run in runs if run.job_type not in WANDB_STAGE_JOB_TYPES]
    runs, history = frames_from_records(records)
    return Records(runs, history, source=source)
