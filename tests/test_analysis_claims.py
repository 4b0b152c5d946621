"""The claim registry: one claim per catalogue row, one sweep per claim, and the catalogue's own words."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_analysis_support import synthetic_run

from analysis.claims import REGISTRY, catalogue, claim, evaluate_all
from analysis.claims.registry import Claim
from analysis.compare import Verdict
from analysis.records import frames_from_records

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# the catalogue lives beside the checkout (shared/ABLATIONS.md) or in it
CATALOGUES = [ROOT / "shared" / "ABLATIONS.md", ROOT.parent / "shared" / "ABLATIONS.md"]
SOURCES = ("000", "001", "002", "003")


def test_every_sweep_has_exactly_one_claim_and_every_claim_a_sweep():
    swept = sorted(c.id for c in catalogue() if c.benchmark is None)
    assert swept == EXPERIMENTS
    measured = [c for c in catalogue() if c.benchmark is not None]
    assert [c.id for c in measured] == ["multi_adapter_memory"]
    assert all(c.benchmark.startswith("python -m experiments.benchmark ") for c in measured)


def test_every_claim_names_its_source_and_what_it_says():
    for row in catalogue():
        assert row.source in SOURCES or row.source == "Gao et al. 2022", row.id
        assert len(row.text) > 20 and row.quote == f"{row.source}: {row.text}"
        assert row.rule.__doc__ and "Rule" in row.rule.__doc__, row.id  # the rule is stated in words
    # the catalogue's order: sources 000 to 003, then the rows beyond the sources
    assert [c.source for c in catalogue()] == sorted(c.source for c in catalogue())
    assert catalogue()[0].id == "three_algorithms" and catalogue()[-1].id == "bon_frontier"


def catalogue_cells() -> dict[str, str]:
    """Row id -> the "what the source says" (or "claim") cell of shared/ABLATIONS.md's tables."""
    path = next((p for p in CATALOGUES if p.exists()), None)
    if path is None:
        pytest.skip("shared/ABLATIONS.md is not beside this checkout")
    cells = {}
    for line in path.read_text().splitlines():
        parts = [part.strip() for part in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(parts) == 4:
            cells[parts[0]] = parts[1]
    return cells


def test_claim_texts_are_the_catalogues():
    cells = catalogue_cells()
    assert set(REGISTRY) <= set(cells)
    for row in catalogue():
        # the cell is "<source>: <text>" (003's reads "003 normalises ...": the source, then the text)
        assert cells[row.id].startswith(row.source) and cells[row.id].endswith(row.text), row.id


def test_a_claim_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        claim("three_algorithms", source="000", text="the same row again", limits="none")(lambda r, h: None)
    with pytest.raises(ValueError, match="needs its source"):
        claim("a_new_row", source="", text="", limits="x")(lambda r, h: None)
    with pytest.raises(ValueError, match="its limits here"):
        claim("a_new_row", source="000", text="a claim", limits="")(lambda r, h: None)
    assert "a_new_row" not in REGISTRY


def test_a_claim_fills_in_its_row_and_takes_only_the_evidence_it_asks_for():
    seen = {}

    def rule(runs, history, *, best_of_n=None):
        seen["best_of_n"] = best_of_n
        return Verdict("inconclusive", note="a rule's own words")

    row = Claim("a_row", "001", "a claim", rule)
    assert row.evidence() == ["best_of_n"]
    runs, history = frames_from_records([synthetic_run("r", 0)])
    verdict = row(runs, history, benchmarks=[{"mode": "none"}], best_of_n="curves")
    assert seen == {"best_of_n": "curves"}  # benchmarks are not passed to a rule that does not ask
    assert (verdict.id, verdict.claim, verdict.note) == ("a_row", "001: a claim", "a rule's own words")
    assert REGISTRY["multi_adapter_memory"].evidence() == ["benchmarks"]
    assert REGISTRY["bon_frontier"].evidence() == ["best_of_n"]
    assert all(v.id and v.claim for v in evaluate_all(runs, history))
