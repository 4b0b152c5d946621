"""One W&B run per job plus the project's own run record, with the same rows in both.

The local record is the source of truth that analysis reads without W&B or torch:

- `history.jsonl`: one JSON object per `Tracker.log` call, keys exactly as given, one line each,
  flushed as written (a killed job loses at most the line being written).
- `summary.json`: the merged `Tracker.summary` values, pretty-printed, replaced atomically.
- `tables/<name>.jsonl`: one line per `Tracker.log_table` call, `{**step, "columns": [...], "rows": [...]}`.

Numbers are written as standard JSON: numpy / torch scalars become Python numbers and non-finite
floats (NaN, ±inf) become `null`, which `json.loads` and `pandas.read_json(lines=True)` read back as
None / NaN. W&B gets the original values (it shows NaN and inf itself).

W&B is a mirror that must never stop training: if `wandb.init` or a later W&B call raises, a warning
says so and the job goes on with the local record only. In online mode an unreachable server holds
the start for wandb's init_timeout (90 s; env WANDB_INIT_TIMEOUT). Offline runs land in
`<run_dir>/wandb/` and are uploaded later with `wandb sync <run_dir>/wandb/offline-run-*`.

A resumed run (`rewind`) cuts the local record back to its checkpoint and makes W&B hold every kept
row once. Offline, each process writes a folder of its own, and `wandb sync` of several folders of
one run replaces its history rather than appending to it: the resumed run's folder is therefore
rebuilt whole, by replaying the kept record into it, and the earlier folders of the run are deleted.
Online, the server already holds the rows up to the last iteration it received: those are not sent
again (the rows between the checkpoint and the kill stay as the killed process sent them; on CPU a
resumed run repeats them exactly), only the kept rows the server lacks are replayed.

A table goes to W&B as a row of its own (the table and the `step` keys), so W&B has one row per
`log_table` call more than history.jsonl.

Every RL key is plotted against `budget`, the budget units the updates have consumed (so algorithms
with different batch shapes line up at equal budget, and an offline buffer generated up front or
preference pairs that are never generated line up by what was trained on, not by `samples`
generated), except stage rows: `sft/*` against `sft/step` and `rm/*` against `rm/step`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import string
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import wandb

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
STEP_METRICS = ("budget", "sft/step", "rm/step")
# counters every RL row carries; defined up front so they are x-axis choices from the first row
RL_COUNTERS = ("iteration", "samples", "tokens", "time/elapsed_s")
STAGE_PREFIXES = ("sft/", "rm/")

_ID_CHARS = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    """A W&B-style run id (8 base-36 characters), made locally so that a resume can reuse it."""
    # wandb.util.generate_id is gone in wandb 0.31; this is what wandb.sdk.lib.runid does
    return "".join(secrets.choice(_ID_CHARS) for _ in range(8))


def step_metric_for(key: str) -> str | None:
    """The x-axis W&B plots `key` against; None for the step metrics themselves."""
    if key in STEP_METRICS:
        return None
    for prefix in STAGE_PREFIXES:
        if key.startswith(prefix):
            return f"{prefix}step"
    return "budget"


def folder_artifact(folder: Path, type: str) -> wandb.Artifact:
    """A W&B artifact named after an artifact folder that references it by path (file://, nothing uploaded,
    no weights hashed). The run that builds the folder and every run that uses it make the same one, so
    W&B resolves them to one version and draws the lineage between the runs."""
    import wandb

    artifact = wandb.Artifact(folder.name, type=type)
    artifact.add_reference(folder.resolve().as_uri(), checksum=False)
    return artifact


def to_python(value: Any) -> Any:
    """Numpy / torch scalars (anything with `.item()`) to Python numbers, through dicts and lists."""
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        # a tensor or array with more than one element raises here, as a row value should
        return value.item()
    return value


def _nonfinite_to_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nonfinite_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nonfinite_to_null(v) for v in value]
    return value


def _json_line(obj: dict[str, Any]) -> str:
    # allow_nan=False: fail loudly rather than write the non-standard NaN / Infinity tokens
    return json.dumps(_nonfinite_to_null(obj), allow_nan=False) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_lines(path: Path) -> list[tuple[str, dict]]:
    """The lines of a JSON-lines file with their rows ([] when there is none), unreadable lines skipped."""
    if not path.exists():
        return []
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            lines.append((line, json.loads(line)))
        except json.JSONDecodeError:
            # the last line of a job killed while writing it
            log.warning("dropping unreadable line %d of %s", number, path)
    return lines


def _keep_until(path: Path, key: str, max_value: float) -> None:
    """Rewrite a JSON-lines file keeping lines with `line[key] <= max_value` or without `key`."""
    if not path.exists():
        return
    kept = [line + "\n" for line, row in _read_lines(path) if row.get(key) is None or row[key] <= max_value]
    _atomic_write(path, "".join(kept))


class Tracker:
    """One W&B run (online, offline or disabled) and the local run record in `run_dir`.

    `enabled=False` is for the non-zero ranks of a multi-process run: nothing is written anywhere
    and every method is a no-op. Use as a context manager, or call `finish` in a `finally`, so a job
    of a sequential sweep always closes its W&B run before the next job opens one.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        mode: str,
        project: str,
        entity: str | None,
        group: str,
        job_type: str,
        name: str,
        tags: list[str],
        config: dict,
        resume_id: str | None = None,
        enabled: bool = True,
        wandb_dir: str | Path | None = None,
        reinit: str = "finish_previous",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"logger mode must be one of {MODES}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.run_id: str = resume_id or new_run_id()
        self._run: wandb.Run | None = None
        self._defined: set[str] = set()
        self._finished = False
        # after a resume, rows with `row[key] <= value` that W&B already holds: (key, value)
        self._held: tuple[str, float] | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if mode == "disabled":
            return
        try:
            import wandb  # lazy: the disabled paths and readers of the record never need it

            self._run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                job_type=job_type,
                name=name,
                tags=tags,
                config=config,
                dir=wandb_dir or self.run_dir,
                mode=mode,
                id=self.run_id,
                resume="allow" if resume_id else None,
                # a Hydra multirun runs its jobs one after another in this process: a run some job
                # left open is closed rather than returned and logged into ("create_new" for a stage's
                # run, opened beside the job's own)
                reinit=reinit,
            )
        except Exception as exc:
            self._drop_wandb("wandb.init", exc)
            return
        self._guarded("define_metric", self._define_metrics, [*STEP_METRICS, *RL_COUNTERS])

    # ------------------------------------------------------------------ W&B plumbing

    def _drop_wandb(self, what: str, exc: BaseException) -> None:
        run, self._run = self._run, None
        log.warning(
            "W&B %s failed (%s: %s); the run continues on its local record in %s (history.jsonl, "
            "summary.json). An offline run can be uploaded later with `wandb sync %s/wandb/offline-run-*`; "
            "with no reachable W&B server use logger.mode=offline.",
            what,
            type(exc).__name__,
            exc,
            self.run_dir,
            self.run_dir,
        )
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                log.debug("finishing the failed W&B run also failed", exc_info=True)

    def _guarded(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._run is None:
            return
        try:
            call(*args, **kwargs)
        except Exception as exc:
            self._drop_wandb(what, exc)

    def _define_metrics(self, keys: Iterable[str]) -> None:
        assert self._run is not None
        # exact names, defined as keys first appear, not globs: with define_metric("*", ...) next to
        # "sft/*", wandb 0.31 also step-synced the RL step metric into sft/* rows
        for key in keys:
            if key in self._defined:
                continue
            step = step_metric_for(key)
            if step is None:
                self._run.define_metric(key)
            else:
                self._run.define_metric(key, step_metric=step, step_sync=True)
            self._defined.add(key)

    def _wandb_log(self, row: dict[str, Any]) -> None:
        assert self._run is not None
        if self._held is not None:
            key, value = self._held
            if row.get(key) is not None and row[key] <= value:
                return  # a resumed online run whose server has this row already
        self._define_metrics(row)
        self._run.log(row)

    def _wandb_table(self, name: str, columns: list[str], rows: list[list], step: dict) -> None:
        import wandb

        self._wandb_log({name: wandb.Table(columns=columns, data=rows), **step})

    def _replay(self, key: str) -> None:
        """Send W&B the kept rows it lacks, in the order they were logged; delete superseded offline runs."""
        assert self._run is not None
        # wandb.init restores a resumed online run's summary from the server: there `key` is the last row
        # it received. An offline run (a fresh folder) holds nothing.
        held = None if self._run.offline else self._run.summary.get(key)
        # (position, payload): a table line goes before the row of its step (logged during its evaluation)
        events: list[tuple[tuple[float, int, int], str | None, dict]] = []
        for number, (_, row) in enumerate(_read_lines(self.run_dir / "history.jsonl")):
            events.append(((row.get(key, float("-inf")), 1, number), None, row))
        for path in sorted((self.run_dir / "tables").glob("**/*.jsonl")):
            name = path.relative_to(self.run_dir / "tables").with_suffix("").as_posix()
            for number, (_, line) in enumerate(_read_lines(path)):
                events.append(((line.get(key, float("-inf")), 0, number), name, line))
        for (position, _, _), table, payload in sorted(events, key=lambda event: event[0]):
            if held is not None and position <= held:  # rows without `key` (at -inf) too
                continue
            if table is None:  # history.jsonl holds non-finite values as null
                self._wandb_log({k: math.nan if v is None else v for k, v in payload.items()})
            else:
                step = {k: v for k, v in payload.items() if k not in ("columns", "rows")}
                self._wandb_table(table, payload["columns"], payload["rows"], step)
        if held is not None:
            self._held = (key, held)
        current = Path(self._run.settings.sync_dir)
        for folder in current.parent.glob("offline-run-*"):
            # offline-run-<date>_<time>-<id>, and -<n> after it when two start in the same second
            if folder != current and folder.name.split("-")[3] == self.run_id:
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ public API

    def log(self, row: dict[str, float | int]) -> None:
        """Append `row` to history.jsonl and log it to W&B."""
        if not self.enabled:
            return
        row = to_python(row)
        with open(self.run_dir / "history.jsonl", "a") as f:
            f.write(_json_line(row))
            f.flush()
        self._guarded("log", self._wandb_log, row)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: dict) -> None:
        """Log a W&B Table under `name` together with the step keys in `step` (e.g. iteration,
        budget), and append it to tables/<name>.jsonl."""
        if not self.enabled:
            return
        rows, step = to_python(rows), to_python(step)
        path = self.run_dir / "tables" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(_json_line({**step, "columns": list(columns), "rows": rows}))
            f.flush()
        self._guarded("log_table", self._wandb_table, name, columns, rows, step)

    def summary(self, values: dict) -> None:
        """Merge `values` into summary.json and the W&B run summary."""
        if not self.enabled:
            return
        values = to_python(values)
        path = self.run_dir / "summary.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(_nonfinite_to_null(values))
        _atomic_write(path, json.dumps(merged, indent=2, allow_nan=False) + "\n")
        if self._run is not None:
            self._guarded("summary", self._run.summary.update, values)

    def summary_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """Put a table in the W&B run summary only: its values are already in the local record."""
        if self._run is not None:
            import wandb

            table = wandb.Table(columns=columns, data=to_python(rows))
            self._guarded("summary_table", self._run.summary.update, {name: table})

    def mark_preempting(self) -> None:
        """Tell W&B the run was pre-empted and will be resumed, not failed."""
        if self._run is not None:
            self._guarded("mark_preempting", self._run.mark_preempting)

    def truncate_history(self, key: str, max_value: float) -> None:
        """Keep only the history rows (and table lines) with `row[key] <= max_value`, for a resume
        from a checkpoint at `max_value`. Rows without `key` (e.g. stage rows) are kept."""
        if not self.enabled:
            return
        _keep_until(self.run_dir / "history.jsonl", key, max_value)
        for path in sorted((self.run_dir / "tables").glob("**/*.jsonl")):
            _keep_until(path, key, max_value)

    def rewind(self, key: str, max_value: float) -> None:
        """Start (or resume from a checkpoint at `row[key] == max_value`; -1 for none) with every local
        row past it dropped (`truncate_history`) and W&B holding each kept row once: replayed into a
        fresh offline folder whose predecessors are deleted, or sent online where the server lacks it."""
        if not self.enabled:
            return
        self.truncate_history(key, max_value)
        self._guarded("replay", self._replay, key)

    def log_artifact(self, folder: Path, type: str) -> None:
        """Record in W&B that this run made the (finished) artifact `folder`."""
        self._guarded("log_artifact", lambda: self._run.log_artifact(folder_artifact(folder, type)))

    def use_artifact(self, folder: Path, type: str) -> None:
        """Record in W&B that this run starts from the artifact `folder`."""

        def use() -> None:
            assert self._run is not None
            artifact = folder_artifact(folder, type)
            if self._run.offline:
                # use_artifact refuses offline runs even a local artifact, which it would only log with
                # these flags (the record `wandb sync` turns into the use)
                self._run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
            else:
                self._run.use_artifact(artifact)

        self._guarded("use_artifact", use)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run; idempotent and safe in a `finally`."""
        if self._finished:
            return
        self._finished = True
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:
            log.warning(
                "W&B finish failed (%s: %s); the local record in %s is complete.",
                type(exc).__name__,
                exc,
                self.run_dir,
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
