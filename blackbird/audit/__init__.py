"""Audit: replay one session, user or tenant from the log up to any instant, and report it."""
