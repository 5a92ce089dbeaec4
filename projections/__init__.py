"""Projections: pure folds of the log into read models, run from a checkpoint and rebuildable."""
