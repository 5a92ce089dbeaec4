"""Argument checks for the public API.

Each returns the clean value or raises a :class:`~blackbird.errors.ValidationError` naming the
field and what was expected, before anything is sent (so bad input appends nothing).
"""

from __future__ import annotations

import datetime
import enum
import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from blackbird.errors import PayloadTooLargeError, ValidationError

MAX_METADATA_BYTES = 64 * 1024
MAX_TEXT_LENGTH = 256
MAX_AMOUNT = 1e15

E = TypeVar("E", bound=enum.Enum)


def invalid(field: str, expected: str, got: Any) -> ValidationError:
    """The ValidationError for ``field``: what was expected, what was got."""
    return ValidationError(f"{field}: expected {expected}, got {got}", field=field, expected=expected, got=got)


def check_fraction(value: Any, field: str) -> float:
    """A number from 0 to 1 (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise invalid(field, "a number from 0 to 1", repr(value))
    return float(value)


def check_text(value: Any, field: str) -> str:
    expected = f"a non-empty string of at most {MAX_TEXT_LENGTH} characters"
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_LENGTH:
        got = type(value).__name__ if not isinstance(value, str) else f"{len(value)} characters"
        raise invalid(field, expected, got)
    return value


def check_metadata(metadata: Any, field: str = "metadata") -> dict[str, Any]:
    expected = "a JSON-serialisable dict with string keys"
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise invalid(field, expected, type(metadata).__name__)
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"{field}: expected {expected}; {exc}", field=field, expected=expected, got=str(exc)
        ) from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise PayloadTooLargeError(
            f"{field}: {len(encoded)} bytes as JSON, expected at most {MAX_METADATA_BYTES}",
            field=field,
            expected=f"at most {MAX_METADATA_BYTES} bytes",
            got=len(encoded),
        )
    # round-trip so that what is stored is exactly what JSON can carry (tuples -> lists, ...)
    return json.loads(encoded)  # type: ignore[no-any-return]


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
    if not math.isfinite(amount) or amount < 0 or amount > MAX_AMOUNT:
        raise invalid(field, expected, repr(amount))
    return float(amount)


def check_costs(costs: Any, kind: type[E], field: str = "costs") -> dict[E, float]:
    """``{quota: amount}`` with every key a quota type and every amount valid."""
    if costs is None:
        return {}
    if not isinstance(costs, Mapping):
        raise invalid(field, "a mapping of quota type to amount", type(costs).__name__)
    checked: dict[E, float] = {}
    for key, amount in costs.items():
        quota = check_enum(key, kind, f"{field} key")
        checked[quota] = check_amount(amount, f"{field}.{quota.value}")
    return checked


def check_seconds(value: Any, field: str, *, maximum: float = 366 * 86400) -> float | None:
    """An optional duration in seconds, > 0."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    expected = f"a number of seconds > 0 and <= {maximum:g} (or a timedelta)"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(field, expected, type(value).__name__)
    if not math.isfinite(value) or value <= 0 or value > maximum:
        raise invalid(field, expected, repr(value))
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
    expected = "seconds since the epoch, an aware datetime or a timedelta, in the future"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(field, expected, repr(value) if isinstance(value, float) else type(value).__name__)
    if value <= now:
        raise invalid(field, expected, repr(value))
    return float(value)
