"""`python -m experiments.catalogue`: every row of the ablation catalogue, run and reported.

    python -m experiments.catalogue [ROW ...] [--out DIR] [--seeds 0,1,...] [--dry-run] [OVERRIDE ...]

ROW is a catalogue row (conf/experiment/<row>.yaml, or a row a benchmark measures); none: every row.
OVERRIDE (``key=value``) goes to every sweep, e.g. ``hydra.launcher.n_jobs=4``; ``--seeds`` sets every
row's evaluation seeds (a tuned sweep's ``eval_seeds``, a grid's ``seed``). Each row's sweep runs
on the local parallel launcher into DIR/<row> (default DIR: ``catalogue``), with one artifact cache
for all of them, then its report is written to DIR/<row>/report (by the catalogue, not by the sweep's
end-of-sweep callback, so that a sweep with a failed job is reported too); at the end FINDINGS.md is
regenerated from DIR (``python -m analysis.findings``).

Rows whose sweeps are the same runs (rrhf_fast_but_far and bon_frontier reuse three_algorithms' tuned
arms) run once, in the folder of the first. It is resumable: a sweep that finished is not started
again, and a sweep started again continues its jobs (a job folder with a checkpoint resumes from it,
a finished job only reads its record back), so a catalogue killed half-way loses at most the
iterations since each running job's last checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from analysis.claims import REGISTRY, catalogue
from analysis.findings import DONE, write_findings
from analysis.records import load_local
from analysis.report import build_report
from backbone.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"

register_configs()


@dataclass
class Sweep:
    """One sweep of the catalogue and the rows its runs answer (the first names its folder)."""

    rows: list[str]
    command: list[str]
    benchmark: bool = False
    key: str = ""
    folder: Path = field(default_factory=Path)


def experiment_rows() -> list[str]:
    return sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))


def catalogue_rows() -> list[str]:
    """Every row: those with a sweep and those a benchmark measures, in the catalogue's order."""
    registered = [c.id for c in catalogue() if c.id in experiment_rows() or c.benchmark]
    return registered + [row for row in experiment_rows() if row not in registered]


def compose_row(row: str, overrides: Sequence[str]) -> DictConfig:
    """A row's config with its Hydra part; a sweep override (a grid) is left out: it composes no config."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    single = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            return compose("config", overrides=[f"+experiment={row}", *single], return_hydra_config=True)
    except HydraException as error:
        raise ValueError(f"row {row}: {error}") from error


def seed_overrides(row: str, seeds: Sequence[int]) -> list[str]:
    """The evaluation seeds of a row, however its sweeper names them (a tuned sweep's `eval_seeds`, a
    grid's `seed`)."""
    sweeper = compose_row(row, []).hydra.sweeper
    if "eval_seeds" in sweeper:
        return [f"hydra.sweeper.eval_seeds=[{','.join(map(str, seeds))}]"]
    return [f"seed={','.join(map(str, seeds))}"]


def sweep_key(row: str, overrides: Sequence[str]) -> str:
    """What a row's sweep runs: its composed run config and sweeper, without the folder it goes to, and
    the overrides every sweep gets. Two rows with the same key are the same runs."""
    cfg = compose_row(row, overrides)
    runs = OmegaConf.to_container(cfg, resolve=False)
    hydra = runs.pop("hydra")
    text = json.dumps(
        {"run": runs, "sweeper": hydra["sweeper"], "overrides": list(overrides)}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(
    rows: Sequence[str], out: Path, overrides: Sequence[str], seeds: Sequence[int] | None = None
) -> list[Sweep]:
    """The sweeps to run for ``rows``: one per distinct set of runs, in row order."""
    sweeps: dict[str, Sweep] = {}
    for row in rows:
        claim = REGISTRY.get(row)
        if row not in experiment_rows():
            if claim is None or not claim.benchmark:
                raise ValueError(f"{row!r} is no catalogue row; rows: {', '.join(catalogue_rows())}")
            folder = out / row
            program = claim.benchmark.split()
            command = [
                sys.executable if program[0] == "python" else program[0],
                *program[1:],
                "--out",
                str(folder),
            ]
            sweeps[row] = Sweep([row], command, benchmark=True, key=row, folder=folder)
            continue
        row_overrides = [*overrides, *(seed_overrides(row, seeds) if seeds else [])]
        key = sweep_key(row, row_overrides)
        if key in sweeps:
            sweeps[key].rows.append(row)
            continue
        folder = out / row
        command = [
            sys.executable,
            "-m",
            "experiments.run",
            "-m",
            f"+experiment={row}",
            "hydra/launcher=local_parallel",
            f"hydra.sweep.dir={folder}",
            f"paths.artifacts={out / 'artifacts'}",
            # run_sweep writes the report, also after a sweep that failed: the sweep's own callback is off
            "~hydra.callbacks.sweep_report",
            *row_overrides,
        ]
        sweeps[key] = Sweep([row], command, key=key, folder=folder)
    return list(sweeps.values())


def run_sweep(sweep: Sweep) -> dict:
    """Run one sweep (unless it finished before) and write its report; what happened, as recorded."""
    done = sweep.folder / DONE
    if done.exists():
        record = json.loads(done.read_text())
        if record["key"] == sweep.key and record["returncode"] == 0:
            # the same runs, asked for by more rows than the last time (`catalogue three_algorithms`, then
            # `catalogue`): those rows are answered too, and the findings must see them
            added = [row for row in sweep.rows if row not in record["rows"]]
            if added:
                record["rows"] += added
                done.write_text(json.dumps(record, indent=2))
            print(f"{', '.join(sweep.rows)}: finished before, {sweep.folder}")
            return record
    sweep.folder.mkdir(parents=True, exist_ok=True)
    print(f"{', '.join(sweep.rows)}: {' '.join(sweep.command)}", flush=True)
    start = time.perf_counter()
    with open(sweep.folder / "catalogue.log", "a") as log:
        returncode = subprocess.run(sweep.command, stdout=log, stderr=subprocess.STDOUT).returncode
    record = {
        "rows": sweep.rows,
        "key": sweep.key,
        "command": sweep.command,
        "returncode": returncode,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if not sweep.benchmark:
        build_report(load_local([sweep.folder]), sweep.folder / "report")
    done.write_text(json.dumps(record, indent=2))
    status = "done" if returncode == 0 else f"exit code {returncode}: see {sweep.folder / 'catalogue.log'}"
    print(f"{', '.join(sweep.rows)}: {status} in {record['wall_s']:.0f} s", flush=True)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.catalogue", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("items", nargs="*", help="catalogue rows, and key=value overrides for every sweep")
    parser.add_argument("--out", type=Path, default=Path("catalogue"), help="the catalogue's folder")
    parser.add_argument("--findings", type=Path, default=Path("FINDINGS.md"), help="the findings file")
    parser.add_argument(
        "--seeds", type=lambda text: [int(s) for s in text.split(",")], help="evaluation seeds, e.g. 0,1,2"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps, run nothing")
    args = parser.parse_args(argv)
    overrides = [item for item in args.items if "=" in item]
    rows = [item for item in args.items if "=" not in item] or catalogue_rows()
    try:
        sweeps = plan(rows, args.out.resolve(), overrides, args.seeds)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for sweep in sweeps:
            print(f"{', '.join(sweep.rows)}: {' '.join(sweep.command)}")
        return 0
    records = [run_sweep(sweep) for sweep in sweeps]
    print(f"findings: {write_findings(args.out, args.findings)}")
    failed = [", ".join(r["rows"]) for r in records if r["returncode"] != 0]
    if failed:
        print(f"error: sweeps that did not finish: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
