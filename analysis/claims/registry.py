"""The claim registry: each catalogue row's claim declared once, next to the rule that judges it.

    @claim("rrhf_fast_but_far", source="000", text='"RRHF rises a bit faster, but ..."', limits="...")
    def rrhf_fast_but_far(runs, history) -> Verdict: ...

registers the row `rrhf_fast_but_far` (its sweep: conf/experiment/rrhf_fast_but_far.yaml) and makes the
name a `Claim`, which called like the rule returns its `Verdict` with the row's id and claim filled in.
`source` is the catalogue's source id (shared/ABLATIONS.md: 000 to 003, or a citation for the rows
beyond the sources) and `text` what it says, quoted where the catalogue quotes it; together they read
as the catalogue's "what the source says" cell. A row measured by a benchmark instead of a sweep names
the command (`benchmark=`). `limits` says what a verdict can and cannot tell at the sandbox's scale (a
tiny model on a synthetic task), for FINDINGS.md. A rule takes the `runs` and `history` frames
(analysis.records) and, as keyword-only parameters, any other evidence it needs by its `Records` name
(`benchmarks`, `best_of_n`); `evaluate_all` passes each rule just what it asks for.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analysis.compare import Verdict

Rule = Callable[..., Verdict]


@dataclass(frozen=True)
class Claim:
    """One catalogue row: its id, source and claim, the rule that judges it, and the benchmark command
    that measures it when no sweep does."""

    id: str
    source: str
    text: str
    rule: Rule
    benchmark: str | None = None
    # what a verdict of this row can and cannot say at the sandbox's scale (FINDINGS.md prints it)
    limits: str = ""

    @property
    def quote(self) -> str:
        """The claim as the catalogue cites it: `000: "..."`."""
        return f"{self.source}: {self.text}"

    def evidence(self) -> list[str]:
        """The evidence beyond the runs and history that the rule asks for (its keyword-only parameters)."""
        parameters = inspect.signature(self.rule).parameters.values()
        return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def __call__(self, runs: pd.DataFrame, history: pd.DataFrame, **evidence: Any) -> Verdict:
        wanted = {name: evidence[name] for name in self.evidence() if name in evidence}
        return dataclasses.replace(self.rule(runs, history, **wanted), id=self.id, claim=self.quote)


# every claim by id, in registration order
REGISTRY: dict[str, Claim] = {}


def claim(
    id: str, *, source: str, text: str, limits: str, benchmark: str | None = None
) -> Callable[[Rule], Claim]:
    """Register the decorated rule as the verdict of catalogue row `id` (one rule per row)."""

    def register(rule: Rule) -> Claim:
        if id in REGISTRY:
            raise ValueError(f"claim {id!r} is registered twice")
        if not source or not text or not limits:
            raise ValueError(f"claim {id!r} needs its source, what the source says, and its limits here")
        REGISTRY[id] = Claim(id, source, text, rule, benchmark, limits)
        return REGISTRY[id]

    return register


def catalogue() -> list[Claim]:
    """Every registered claim in the catalogue's order: by source (000 to 003, then the citations of
    the rows beyond the sources), each source's rows in the order its module declares them."""
    return sorted(REGISTRY.values(), key=lambda c: c.source)


def evaluate_all(
    runs: pd.DataFrame,
    history: pd.DataFrame,
    benchmarks: Iterable[Mapping] = (),
    best_of_n: pd.DataFrame | None = None,
) -> list[Verdict]:
    """Every catalogue row's verdict, in the catalogue's order. `runs` may hold every phase of a tuned
    sweep: each rule picks the runs it compares (analysis.compare.Study)."""
    evidence = {"benchmarks": list(benchmarks), "best_of_n": best_of_n}
    return [row(runs, history, **evidence) for row in catalogue()]
