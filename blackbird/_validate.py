"""Argument checks for the public API.

Each returns the clean value or raises a :class:`~blackbird.errors.ValidationError` naming the
field and what was expected, before anything is sent (so bad input appends nothing). The
numbers are those of the one table, :mod:`actors.validation`, which the host holds every command
to again whatever sent it; these checks only answer sooner, with the same field.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from actors import validation
from actors.validation import (
    MAX_AMOUNT,
    MAX_DURATION,
    MAX_INSTANT,
    MAX_NAME_LENGTH,
    METADATA,
    DocumentLimit,
    Invalid,
)
from blackbird.errors import PayloadTooLargeError, ValidationError

E = TypeVar("E", bound=enum.Enum)


def invalid(field: str, expected: str, got: Any) -> ValidationError:
    """The ValidationError for ``field``: what was expected, what was got."""
    return ValidationError(f"{field}: expected {expected}, got {got}", field=field, expected=expected, got=got)


def error_of(problem: Invalid) -> ValidationError:
    """The typed error for a broken rule of :mod:`actors.validation`."""
    kind = PayloadTooLargeError if problem.too_large else ValidationError
    return kind(str(problem), field=problem.field, expected=problem.expected, got=problem.got)


def check_fraction(value: Any, field: str) -> float:
    """A number from 0 to 1 (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise invalid(field, "a number from 0 to 1", repr(value))
    return float(value)


def check_bool(value: Any, field: str) -> bool:
    """A bool, not something truthy: ``"false"`` is refused rather than taken for True."""
    if not isinstance(value, bool):
        raise invalid(field, "True or False", repr(value) if isinstance(value, str) else type(value).__name__)
    return value


def check_text(value: Any, field: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A non-empty string of valid Unicode, at most ``max_length`` characters."""
    expected = f"a non-empty string of at most {max_length} characters"
    if not isinstance(value, str) or not value or len(value) > max_length:
        got = type(value).__name__ if not isinstance(value, str) else f"{len(value)} characters"
        raise invalid(field, expected, got)
    return check_str(value, field)


def check_str(value: str, field: str) -> str:
    """``value`` if it is valid Unicode (no lone surrogates); else ValidationError."""
    try:
        validation.check_str(value, field)
    except Invalid as problem:
        raise error_of(problem) from None
    return value


def check_document(value: Any, field: str, limit: DocumentLimit) -> Any:
    """``value`` as JSON carries it (tuples become lists) if it is plain JSON data within
    ``limit`` (size as JSON, depth); else ValidationError (PayloadTooLargeError for the size)."""
    try:
        validation.check_document(value, field, limit)
    except Invalid as problem:
        raise error_of(problem) from None
    return msgspec.json.decode(msgspec.json.encode(value))


def check_metadata(metadata: Any, field: str = "metadata", limit: DocumentLimit = METADATA) -> dict[str, Any]:
    """A dict of plain JSON data within ``limit`` (None: empty), as JSON carries it."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise invalid(field, "a dict with string keys", type(metadata).__name__)
    checked: dict[str, Any] = check_document(metadata, field, limit)
    return checked


def check_enum(value: Any, kind: type[E], field: str) -> E:
    """``value`` as a member of ``kind`` (a member itself or its value)."""
    try:
        return kind(getattr(value, "value", value))
    except (ValueError, TypeError):
        expected = "one of " + ", ".join(str(m.value) for m in kind)
        got = repr(value) if isinstance(value, str) else type(value).__name__
        raise invalid(field, expected, got) from None


def check_amount(amount: Any, field: str = "amount") -> float:
    """A finite, non-negative number (bool is not a number here)."""
    expected = f"a finite number >= 0 and <= {MAX_AMOUNT:g}"
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise invalid(field, expected, type(amount).__name__)
    if not 0 <= amount <= MAX_AMOUNT:  # NaN fails every comparison; a huge int compares exactly
        raise invalid(field, expected, repr(amount) if isinstance(amount, float) or amount < 2**64 else "a huge int")
    return float(amount)


def check_costs(costs: Any, kind: type[E], field: str = "costs") -> dict[E, float]:
    """``{quota: amount}`` with every key a quota type and every amount valid (an error names
    ``field``, as the host does)."""
    if costs is None:
        return {}
    if not isinstance(costs, Mapping):
        raise invalid(field, "a mapping of quota type to amount", type(costs).__name__)
    checked: dict[E, float] = {}
    for key, amount in costs.items():
        quota = check_enum(key, kind, field)
        try:
            checked[quota] = check_amount(amount, field)
        except ValidationError as exc:
            raise invalid(field, exc.expected, f"{quota.value}={exc.got}") from None
    return checked


def check_seconds(value: Any, field: str, *, maximum: float = MAX_DURATION) -> float | None:
    """An optional duration in seconds, > 0."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    expected = f"a number of seconds > 0 and <= {maximum:g} (or a timedelta)"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(field, expected, type(value).__name__)
    if not 0 < value <= maximum:
        raise invalid(field, expected, repr(value) if isinstance(value, float) or value < 2**64 else "a huge int")
    return float(value)


def check_instant(value: Any, field: str, now: float) -> float | None:
    """An optional future instant: seconds since the epoch, an aware datetime, or a timedelta
    from ``now``."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = now + value.total_seconds()
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise invalid(field, "a timezone-aware datetime", "a naive datetime")
        value = value.timestamp()
    expected = (
        "seconds since the epoch, an aware datetime or a timedelta, in the future "
        f"(at most {MAX_INSTANT:.0f}: the end of year 9999)"
    )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(field, expected, type(value).__name__)
    if not now < value <= MAX_INSTANT:
        raise invalid(field, expected, repr(value) if isinstance(value, float) or value < 2**64 else "a huge int")
    return float(value)


def check_epoch(value: Any, field: str) -> float:
    """An instant past or future: seconds since the epoch, from 0 to 9999-12-31 (bool is not a
    number here; NaN is refused)."""
    expected = f"seconds since the epoch, from 0 to {MAX_INSTANT:.0f}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(field, expected, type(value).__name__)
    if not 0 <= value <= MAX_INSTANT:  # NaN fails every comparison
        raise invalid(field, expected, repr(value) if isinstance(value, float) else "an int out of range")
    return float(value)
