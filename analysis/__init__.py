"""Analysis of run records: read them (local sweep folders or a W&B group), aggregate seeds, plot, and
test the claims of the ablation catalogue. Reads files only: no torch, no model.

records (runs and history frames) -> stats (per-run measures, seed intervals) -> compare (selection and
per-seed effects) -> claims (the catalogue's claims, each with its verdict rule) and plots -> report (the
CLI). run_summary: one run's end-of-run table, from its summary.json.
"""
