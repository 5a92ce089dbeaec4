"""Folds over the log: read models rebuilt from JetStream (see the projections issue)."""
