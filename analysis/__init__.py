"""Analysis of run records: read them (local sweep folders or a W&B group), aggregate seeds, plot, and
test the claims of the ablation catalogue. Reads files only: no torch, no model.

records (runs and history frames) -> stats (per-run measures, seed intervals) -> compare (selection and
per-seed effects) -> verdicts (one function per catalogue row) and plots -> report (the CLI).
"""
