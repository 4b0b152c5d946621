"""`python -m analysis.findings CATALOGUE [--out FINDINGS.md]`: the catalogue's verdicts as one page.

CATALOGUE is the folder `python -m experiments.catalogue` ran into: one folder per sweep, each with
its `catalogue.json` naming the rows its runs answer. Every row of the catalogue gets its verdict from
its own sweep's runs (a row with no sweep there reads "not run"), with the numbers behind it, the seeds,
when and on which commit and machine its runs ran (their summaries' `environment`), and a paragraph:
the claim, what the verdict says, and its limits at this scale. A row with no sweep in the folder keeps
its entry from the page being rewritten (`--fresh`: "not run"), so a catalogue too long for one sitting
is run a few rows at a time and each row still cites its own runs. The page is a function of the folder
and the page before: generating it again from the same folder gives the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.arms import of_phase, read_tuning
from analysis.claims import Claim, catalogue
from analysis.compare import Verdict
from analysis.records import Records, flatten_summary, load_local
from analysis.report import format_numbers, markdown_table

DONE = "catalogue.json"  # in a sweep's folder once experiments.catalogue has run it (or its benchmark)

MEANING = {
    "supported": "The runs support the claim: its effect is clear in the claimed direction.",
    "contradicted": "The runs contradict the claim: the effect is clear the other way, or the arms are "
    "equivalent where the claim says they differ.",
    "inconclusive": "The runs cannot decide: no effect is clear either way at this number of seeds.",
    "not run": "No runs of this row were found in the catalogue folder.",
}


def row_folders(folder: Path) -> dict[str, Path]:
    """Each row answered by a finished sweep of the catalogue, and that sweep's folder."""
    rows = {}
    for done in sorted(folder.glob(f"*/{DONE}")):
        for row in json.loads(done.read_text())["rows"]:
            rows[row] = done.parent
    return rows


def provenance(runs: pd.DataFrame) -> dict[str, str]:
    """When, on what code and where a row's runs ran, from their summaries' `environment`."""

    def values(column: str) -> list[str]:
        return sorted({str(v) for v in runs.get(column, pd.Series(dtype=object)).dropna()})

    dates = values("environment/date")
    # a frame's missing values are NaN: only real commits count, and only a True marks one dirty
    flags = zip(runs.get("environment/commit", []), runs.get("environment/dirty", []))
    pairs = {(c, isinstance(d, (bool, np.bool_)) and bool(d)) for c, d in flags if isinstance(c, str)}
    commits = [c[:10] + ("+dirty" if d else "") for c, d in sorted(pairs)]
    machines = sorted(
        {
            f"{cpu}, {int(cores)} cores" + (f", {gpu}" if isinstance(gpu, str) else "")
            for cpu, cores, gpu in zip(
                runs.get("environment/cpu", []),
                runs.get("environment/cores", []),
                runs.get("environment/gpu", []),
            )
            if isinstance(cpu, str)
        }
    )
    return {
        "date": " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "unknown",
        "commit": ", ".join(commits) or "unknown",
        "machine": "; ".join(machines) or "unknown",
    }


def judge_row(row: Claim, records: Records | None) -> tuple[Verdict, dict[str, str]]:
    if records is None:
        return Verdict("not run", id=row.id, claim=row.quote), {"date": "", "commit": "", "machine": ""}
    verdict = row(records.runs, records.history, benchmarks=records.benchmarks, best_of_n=records.best_of_n)
    # a row measured by a benchmark: its results carry the environment the runs' summaries do
    measured = pd.DataFrame([flatten_summary(result) for result in records.benchmarks])
    return verdict, provenance(records.runs if row.benchmark is None else measured)


def previous_entries(page: str) -> dict[str, tuple[str, str]]:
    """The rows a findings page has a verdict for (not "not run"): row id -> (its table line, its
    section), verbatim."""
    table = {
        line.split(" | ")[0].removeprefix("| "): line
        for line in page.split("\n\n## ")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| row |")
    }
    sections = {chunk.split("\n", 1)[0]: f"## {chunk.rstrip()}" for chunk in page.split("\n\n## ")[1:]}
    return {
        row: (line, sections[row])
        for row, line in table.items()
        if line.split(" | ")[1] != "not run" and row in sections
    }


def tuned_arms(runs: pd.DataFrame) -> str:
    """What a tuned sweep's verdict rests on: each arm's pick, its tuning score, a knob picked at its
    grid's edge (the best may lie beyond), and the optimizer steps its evaluation runs took (the
    protocol compares at equal samples, so an arm with more gradient steps must be visible); "" for a
    sweep that tuned nothing."""
    tuning = read_tuning(runs) if "path" in runs else {}
    if not tuning:
        return ""
    steps = of_phase(runs).groupby("algorithm")["optimizer_steps"].mean() if "optimizer_steps" in runs else {}
    seeds = sorted({seed for arm in tuning.values() for seed in arm["tuning_seeds"]})
    arms = []
    for arm, tuned in sorted(tuning.items()):
        notes = [f"score {tuned['score']:.3g}"]
        notes += [
            f"{knob} at its grid's {side} value" for knob, side in sorted(tuned.get("edges", {}).items())
        ]
        if arm in steps:
            notes.append(f"{steps[arm]:.4g} optimizer steps a run")
        arms.append(f"{arm} `{' '.join(tuned['picked'])}` ({', '.join(notes)})")
    return (
        f"Tuned arms (picked on tuning seeds {', '.join(map(str, seeds))} by the tuned sweeper's score, the "
        f"mean gold gain over the budget): {'; '.join(arms)}."
    )


def row_entry(
    claim: Claim, sweep: str, verdict: Verdict, where: dict[str, str], tuned: str = ""
) -> tuple[str, str]:
    """A judged row's table line and section."""
    cells = [claim.id, verdict.verdict, format_numbers(verdict.numbers) or "-", verdict.seeds]
    line = markdown_table([""] * 7, [[*cells, where["date"], where["commit"], where["machine"]]])
    paragraph = [
        f"## {claim.id}",
        f"**Claim** ({claim.quote}). **Verdict: {verdict.verdict}**"
        + (f", from `{sweep}/`" if sweep else "")
        + f". {MEANING.get(verdict.verdict, '')}",
    ]
    if verdict.numbers:
        paragraph.append(f"Numbers (n = {verdict.seeds}): {format_numbers(verdict.numbers)}.")
    if verdict.note:
        paragraph.append(f"Note: {verdict.note}")
    if tuned:
        paragraph.append(tuned)
    paragraph.append(f"**Limits at this scale.** {claim.limits}")
    return line.splitlines()[-1], "\n\n".join(paragraph)


def render(folder: Path, entries: list[tuple[str, str]]) -> str:
    header = markdown_table(["row", "verdict", "numbers", "n", "date", "commit", "machine"], [])
    sections = [
        "# Findings",
        f"Every row of the ablation catalogue (shared/ABLATIONS.md, version 2) as `python -m experiments."
        f"catalogue` ran it into `{folder.name}/`. Generated by `python -m analysis.findings {folder.name}`; "
        "do not edit by hand. A row that folder did not run keeps its entry from the page before, with the "
        "date, commit and machine of its own runs. n is the number of seeds behind a verdict (paired where "
        "the arms share a seed); ± is a 95% interval; each sweep's own report (`<sweep>/report/report.md`) "
        "has the curves, the arms' budgets and the gold-KL frontier.",
        "\n".join([header, *(line for line, _ in entries)]),
        *(section for _, section in entries),
    ]
    return "\n\n".join(sections) + "\n"


def write_findings(folder: Path, out: Path, keep: bool = True) -> Path:
    """Judge every row from `folder` into the page `out`; with `keep`, a row `folder` has no sweep for
    keeps the entry `out` already gives it."""
    folders = row_folders(folder)
    loaded = {path: load_local([path]) for path in sorted(set(folders.values()))}
    previous = previous_entries(out.read_text()) if keep and out.exists() else {}
    entries = []
    for claim in catalogue():
        sweep = folders.get(claim.id)
        if sweep is None and claim.id in previous:
            entries.append(previous[claim.id])
            continue
        records = loaded.get(sweep)
        verdict, where = judge_row(claim, records)
        tuned = tuned_arms(records.runs) if records is not None and claim.benchmark is None else ""
        entries.append(row_entry(claim, sweep.name if sweep else "", verdict, where, tuned))
    out.write_text(render(folder, entries))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.findings", description=__doc__.split("\n\n")[0])
    parser.add_argument("catalogue", type=Path, help="the folder experiments.catalogue ran into")
    parser.add_argument("--out", type=Path, default=Path("FINDINGS.md"), help="the page to write")
    parser.add_argument(
        "--fresh", action="store_true", help="rows the folder did not run read 'not run' (default: kept)"
    )
    args = parser.parse_args(argv)
    if not args.catalogue.is_dir():
        print(f"error: {args.catalogue} is not a folder", file=sys.stderr)
        return 2
    print(f"findings: {write_findings(args.catalogue, args.out, keep=not args.fresh)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
