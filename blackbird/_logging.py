"""Default log output when the application has not configured structlog itself.

Blackbird logs through structlog with tenant/session bound. If the host application never
called ``structlog.configure``, the first client (or the CLI) installs a level filter (the
``log_level`` setting, ``BLACKBIRD_LOG_LEVEL``; default ``warning``) so a library does not flood
stdout; an application's own configuration, made before or after, always wins. Importing
``blackbird`` configures nothing.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_default_logging(level: str | None = None, *, force: bool = False) -> None:
    """Install Blackbird's default structlog configuration unless one exists (or ``force``)."""
    if structlog.is_configured() and not force:
        return
    name = (level or "warning").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.WARNING
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # sys.stderr looked up per logger, not once: it may be replaced (test capture, daemons)
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
