"""The claims of the ablation catalogue (shared/ABLATIONS.md) and their verdict rules.

One module per source, each declaring its rows with `@claim` (analysis.claims.registry) in the
catalogue's order; `metrics` names what the rules read. A new row is its sweep,
conf/experiment/<id>.yaml, and one decorated function in its source's module (a new source: a new
module, imported here).
"""

# importing a source module registers its claims
from analysis.claims import gao2022, source_000, source_001, source_002, source_003  # noqa: F401
from analysis.claims.registry import REGISTRY, Claim, catalogue, claim, evaluate_all

__all__ = ["REGISTRY", "Claim", "catalogue", "claim", "evaluate_all"]
