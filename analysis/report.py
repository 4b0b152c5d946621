"""`python -m analysis.report`: a sweep's run records as figures, tables and the catalogue's verdicts.

    python -m analysis.report PATH... [--out DIR]
    python -m analysis.report --wandb ENTITY/PROJECT --group GROUP [--out DIR]

PATH is a sweep folder, a job folder, several of them, or a glob pattern (quoted, so the shell leaves it
alone). The report goes to DIR/report.md (default: `<first PATH>/report`, or `report-<GROUP>` for a W&B
group), with its figures as PNG files beside it: a table per series of runs (algorithm and swept knobs),
the failed and incomplete jobs, and the verdict of every row of the ablation catalogue
(shared/ABLATIONS.md; "not run" where the runs it needs are absent). The tables are printed too.
Exit code 2 when a path does not exist, or no run records are found.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from analysis.arms import arms_table, of_phase, read_tuning, tuning_table
from analysis.claims import evaluate_all
from analysis.compare import Verdict
from analysis.frontier import frontier_figure, gold_at_kl_table
from analysis.plots import make_figures
from analysis.records import (
    BUDGET,
    Records,
    budget_label,
    load_local,
    load_wandb,
    mixed_units,
    series,
    series_units,
    unit_label,
)
from analysis.stats import CI, gain, last_tenth_mean, mean_ci

LAST_TENTH_METRICS = ("eval/reward_mean", "eval/gold_mean", "eval/kl_mean")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def series_table(runs: pd.DataFrame, history: pd.DataFrame) -> str:
    """One row per series of ok runs: counts, budget (the largest any of its runs reached; the header
    names the unit(s)), last-10% means of eval values and reward gain with 95% CIs."""
    histories = {str(r): rows for r, rows in history.groupby("run", sort=False)}
    by_id = runs.set_index(runs["run"].astype(str))
    headers = ["series", "runs", "seeds", budget_label(runs)]
    headers += [f"last-10% mean {m}" for m in LAST_TENTH_METRICS]
    headers += ["gain eval/reward_mean", "wall time (s)"]
    rows = []
    for label, run_ids in series(runs).items():
        here = [histories[r] for r in run_ids if r in histories]
        late = [mean_ci(last_tenth_mean(h, m) for h in here) for m in LAST_TENTH_METRICS]
        wall = by_id.loc[run_ids, "wall_time_s"] if "wall_time_s" in by_id.columns else pd.Series(dtype=float)
        rows.append(
            [
                label,
                len(run_ids),
                by_id.loc[run_ids, "seed"].nunique(),
                f"{max((h[BUDGET].max() for h in here), default=0):.0f}",
                *late,
                mean_ci(gain(h, "eval/reward_mean") for h in here),
                f"{wall.mean():.0f}",
            ]
        )
    return markdown_table(headers, rows)


def units_note(runs: pd.DataFrame) -> str:
    """A warning when the runs count their budgets in different units, else empty."""
    if not mixed_units(runs):
        return ""
    return (
        f"**Budgets in different units** ({unit_label(series_units(runs))}): each iteration consumes "
        "rollout.samples_per_iteration units of its run's own kind, so an equal budget between them is "
        "an equal-iteration comparison, not equal data; the verdicts that compare them say so in their "
        "notes."
    )


def failures_table(runs: pd.DataFrame) -> str:
    failed = runs[runs["status"] != "ok"]
    rows = failed[["path", "status", "algorithm", "seed", "error"]].itertuples(index=False, name=None)
    return markdown_table(["path", "status", "algorithm", "seed", "reason"], list(rows))


def format_numbers(numbers: dict) -> str:
    return "; ".join(f"{k} = {_cell(v) if not isinstance(v, CI) else v}" for k, v in numbers.items())


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    rows = [
        (v.id, v.claim, v.verdict, format_numbers(v.numbers), v.seeds, v.source, v.note) for v in verdicts
    ]
    return markdown_table(["id", "claim", "verdict", "numbers", "seeds", "source", "note"], rows)


class Report(NamedTuple):
    """What `build_report` wrote: report.md's path, its tables as text, and every row's verdict."""

    path: Path
    text: str
    verdicts: list[Verdict]


def build_report(records: Records, out: Path) -> Report:
    """Write the figures and `out/report.md`."""
    # a tuning grid's runs choose the arms; only the evaluation runs are compared
    runs = of_phase(records.runs)
    ok = runs[runs["status"] == "ok"]
    ok_history = records.history[records.history["run"].isin(ok["run"])]
    counts = runs["status"].value_counts()
    sections = []
    tuning = read_tuning(records.runs)
    if tuning or ok["algorithm"].nunique() > 1:
        sections.append(
            "## Arms\n\nEach algorithm as it ran: at the config its tuning picked (grid below) when the "
            "sweep was tuned, on evaluation seeds apart from the tuning seeds; 'grid edge' names the knobs "
            "picked at the lowest or highest value tried, where the arm's best may lie beyond its grid "
            "(`hydra.sweeper.extend_edges=1` tunes one step further). Gains are the last-10% "
            "mean (over each run's last 10% of iterations) minus iteration 0; final KL is the last "
            "evaluation's (± = 95% interval over seeds, its method named); the budget columns are means "
            "per run.\n\n" + markdown_table(*arms_table(ok, ok_history, tuning))
        )
    if tuning:
        sections.append(
            "## Tuning\n\nScore: the mean gold gain over the budget (area under the gold curve), "
            "per tuning seed.\n\n" + markdown_table(*tuning_table(tuning))
        )
    has_gold = "eval/gold_mean" in ok_history.columns and ok_history["eval/gold_mean"].notna().any()
    if has_gold:
        sections.append(
            "## Gold at KL budgets\n\nGold where each run's path first reaches the KL from the SFT policy "
            "(interpolated in sqrt(KL), never extrapolated; runs that never reach it are counted, not "
            "averaged); best-of-n from the same SFT policy and reward model is the reference (Gao et al. "
            "2022).\n\n" + markdown_table(*gold_at_kl_table(ok, ok_history, records.best_of_n))
        )
    units = units_note(ok)
    sections.append(
        "## Runs by series\n\nLast-10% mean = mean over each run's last 10% of iterations (final, in the "
        "run records, is the last evaluation); ± = 95% t interval over seeds; budget = the units the "
        "updates consumed (samples generated and trained on, or preference pairs).\n\n"
        + (units + "\n\n" if units else "")
        + series_table(ok, ok_history)
    )
    if len(ok) < len(runs):
        sections.append("## Failed or incomplete runs\n\n" + failures_table(runs))
    # every phase of a tuned sweep: a row that judges the tuning grid (tuning_sensitivity) reads it
    verdicts = evaluate_all(records.runs, records.history, records.benchmarks, records.best_of_n)
    sections.append(
        "## Verdicts (shared/ABLATIONS.md)\n\nEach rule is applied per seed, then across seeds, at equal "
        "budget: an effect is clear when its test (t; the exact sign test where a seed is censored) "
        "rejects at 0.05 after Holm's correction across the row's effects; equivalence claims use TOST "
        "within the row's margin. An inconclusive verdict's note gives the seeds that 80% power would "
        "need at the observed effect and spread.\n\n" + verdict_table(verdicts)
    )
    figures = make_figures(ok, ok_history, out) if len(ok_history) else {}
    if has_gold:
        figures["Gold vs sqrt(KL): the frontier, best-of-n as reference"] = frontier_figure(
            ok, ok_history, records.best_of_n, out
        )
    header = [
        "# Sweep report",
        f"Source: {records.source}",
        "Runs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "failed", "incomplete")),
        "## Figures",
        *(f"![{title}]({path.name})" for title, path in figures.items()),
        *([] if figures else ["None: no finished run has RL rows."]),
    ]
    text = "\n\n".join(sections)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n\n".join(header) + "\n\n" + text + "\n")
    return Report(path, text, verdicts)


def _default_out(args: argparse.Namespace) -> Path:
    if args.wandb:
        return Path(f"report-{args.group}")
    # a glob pattern's folder is its leading part without wildcards
    fixed = itertools.takewhile(lambda part: not glob.has_magic(part), Path(args.paths[0]).parts)
    return Path(*fixed, "report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="sweep folders, job folders or glob patterns")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read a W&B group instead of folders")
    parser.add_argument("--group", help="the W&B group (the sweep's name)")
    parser.add_argument("--out", type=Path, help="report folder (default: <first PATH>/report)")
    args = parser.parse_args(argv)
    if bool(args.wandb) == bool(args.paths):
        parser.error("give run record PATHs or --wandb ENTITY/PROJECT --group GROUP")
    if args.wandb and not args.group:
        parser.error("--wandb needs --group")
    try:
        records = load_wandb(args.wandb, args.group) if args.wandb else load_local(args.paths)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # W&B's errors (no API key, no network, no such project) share no base class
        if not args.wandb:
            raise
        print(f"error: could not read W&B {args.wandb}, group {args.group}: {exc}", file=sys.stderr)
        return 2
    if records.runs.empty:
        print(f"error: no run records found in {records.source}", file=sys.stderr)
        return 2
    out = args.out or _default_out(args)
    report = build_report(records, out)
    print(report.text)
    print(f"\nreport: {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
