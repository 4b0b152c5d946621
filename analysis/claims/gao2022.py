"""Rows beyond the sources: claims from the literature about the algorithms the sandbox compares."""

from __future__ import annotations

import math

import pandas as pd

from analysis.claims.metrics import GOLD, KL
from analysis.claims.registry import claim
from analysis.compare import Effect, Finding, Group, Study, Verdict, finding, judge, summary
from analysis.frontier import bon_paths, matched_gold


@claim(
    "bon_frontier",
    source="Gao et al. 2022",
    text="best-of-n is more KL-efficient than RL: at equal KL, its gold is higher",
    limits=(
        "Best-of-n up to n = 256 reaches sqrt(KL) of about 2.1, so the comparison is only at KLs both "
        "reach; Gao et al. measured it with reward models of 3M to 3B parameters and a 1.2B policy."
    ),
)
def bon_frontier(
    runs: pd.DataFrame, history: pd.DataFrame, *, best_of_n: pd.DataFrame | None = None
) -> Verdict:
    """Rule (every algorithm's evaluation runs; each run paired with the best-of-n curve of its own SFT
    policy and reward model, `best_of_n.json`, so per seed): per run, at the largest sqrt(KL) both its
    (sqrt eval/kl_mean, eval/gold_mean) path and its best-of-n curve reach (analysis.frontier
    `matched_gold`), best-of-n's gold minus the run's. One effect per algorithm, Holm across them.
    Supported when every one is clearly positive, contradicted when one is clearly negative."""
    curves = bon_paths(best_of_n)
    artifact_of = dict(zip(best_of_n["run"].astype(str), best_of_n["artifact"].astype(str))) if curves else {}

    def at_matched_kl(history: pd.DataFrame) -> tuple[float, float, float]:
        curve = curves.get(artifact_of.get(str(history["run"].iloc[0]), ""))
        return (math.nan,) * 3 if curve is None else matched_gold(history, curve)

    def rule(g: Group) -> Finding | None:
        if not curves or not (g.has_metric(GOLD) and g.has_metric(KL)):
            return None
        effects, numbers = [], {}
        for algorithm in g.values():
            kl, gold, bon = (g.measure(algorithm, lambda h, i=i: at_matched_kl(h)[i]) for i in range(3))
            gap = Effect(
                f"best-of-n gold - gold at matched KL [{algorithm}]", {s: bon[s] - gold[s] for s in gold}
            )
            if not gap.values().size:
                continue
            effects.append(gap)
            numbers[f"matched sqrt KL [{algorithm}]"] = summary(kl.values())
            numbers[f"gold at matched KL [{algorithm}]"] = summary(gold.values())
            numbers[f"best-of-n gold at matched KL [{algorithm}]"] = summary(bon.values())
        if not effects:
            return None
        return finding(effects, numbers, min(e.values().size for e in effects))

    groups = Study(runs, history).groups(["algorithm.name"], min_values=1)
    return judge(groups, rule, "ok evaluation runs with gold and their best_of_n.json (best-of-n curves)")
