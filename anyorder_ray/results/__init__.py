"""Results and reporting (no Ray): per-trial rows from a Tune result grid, tables (CSV + Markdown), the per-arm
summary over seeds, plots, and paired comparisons of two evaluations of the same checkpoints."""
