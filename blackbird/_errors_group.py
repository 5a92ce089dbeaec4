"""Unwrapping exception groups, so callers of the public API get the typed error itself.

Task groups wrap every error in an exception group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def unwrap(exc: BaseException) -> BaseException:
    """The single error inside (nested) exception groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise an exception group that holds one error as that error (its traceback kept)."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner = unwrap(group)
        if inner is group:
            raise
        raise inner from None
