"""The end of one run at a glance: a short table read back from its run record.

Each stage's headline numbers and wall time, from `summary.json` (what the stages and the trainer
recorded), so the table cannot disagree with the record:

- SFT: the held-out loss; the reward model: held-out pairwise accuracy and gold agreement (Spearman
  of its scores with the gold reward, tasks with one);
- RL: the first evaluation (iteration 0, the SFT policy) and the final one (the last evaluation: the
  `initial/` and `final/` values of the summary) of the proxy reward, gold, KL and response length.

A stage read from the artifact cache shows the time it took when it was built, marked `cached`; it
was built in this run when `history.jsonl` holds its rows. Nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("stage", "measure", "first", "final", "time")
# (summary key of the stage's metrics, its name, its metrics' prefix, [(measure, metric key)])
STAGES = (
    ("sft", "SFT", "sft/", [("held-out loss", "eval_loss")]),
    (
        "reward_model",
        "reward model",
        "rm/",
        [("held-out accuracy", "eval_accuracy"), ("gold agreement (Spearman)", "eval_spearman")],
    ),
)
RL_MEASURES = (
    ("proxy reward", "eval/reward_mean"),
    ("gold", "eval/gold_mean"),
    ("KL", "eval/kl_mean"),
    ("response length", "eval/response_len_mean"),
)
Row = tuple[str, str, float | None, float | None, str]


def _built_here(run_dir: Path) -> set[str]:
    """The stage prefixes (`sft/`, `rm/`) whose training rows this run logged."""
    path = run_dir / "history.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {prefix for prefix in ("sft/", "rm/") if any(f"{prefix}step" in row for row in rows)}


def _seconds(value: float | None, cached: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" + (", cached" if cached else "")


def summary_rows(run_dir: str | Path) -> list[Row]:
    """(stage, measure, first, final, time) per headline number of the run in `run_dir`; a stage shows
    its time on its first row. First and final are None where they do not apply."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    built = _built_here(run_dir)
    rows: list[Row] = []
    for key, stage, prefix, measures in STAGES:
        metrics = summary.get(key, {})
        time = _seconds(metrics.get(f"{prefix}wall_time_s"), cached=prefix not in built)
        present = [(measure, metrics[prefix + m]) for measure, m in measures if prefix + m in metrics]
        for i, (measure, value) in enumerate(present):
            rows.append((stage, measure, None, value, time if i == 0 else ""))
    rl = [(measure, m) for measure, m in RL_MEASURES if f"final/{m}" in summary]
    for i, (measure, m) in enumerate(rl):
        time = _seconds(summary.get("wall_time_s")) if i == 0 else ""
        rows.append(("RL", f"{measure} ({m})", summary[f"initial/{m}"], summary[f"final/{m}"], time))
    return rows


def _cell(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return f"{round(value, 3) + 0.0:.3f}"  # + 0.0: a tiny negative reads 0.000, not -0.000
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """Aligned plain text: words to the left, numbers to the right."""
    cells = [list(COLUMNS), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    left = (True, True, False, False, False)
    lines = [
        "  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(row, widths, left)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)
