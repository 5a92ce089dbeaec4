"""Tier policies: configuration, not code.

The packaged defaults live in ``tiers.toml`` beside this module; :func:`load_policy` parses a
TOML document with msgspec, so a wrong field gets an error naming its path.
"""

from __future__ import annotations

import enum
from importlib import resources
from typing import Annotated, Any

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class QuotaType(enum.StrEnum):
    """A metered resource. The value is what the API reports (``get_quota``'s keys)."""

    TOKENS = "tokens"
    API_CALLS = "api_calls"
    STORAGE = "storage"
    COMPUTE_TIME = "compute_time"
    BANDWIDTH = "bandwidth"


class RateLimitType(enum.StrEnum):
    """A rate-limit window."""

    PER_SECOND = "per_second"
    PER_MINUTE = "per_minute"
    PER_HOUR = "per_hour"
    PER_DAY = "per_day"

    @property
    def seconds(self) -> float:
        return _WINDOW_SECONDS[self]


_WINDOW_SECONDS = {
    RateLimitType.PER_SECOND: 1.0,
    RateLimitType.PER_MINUTE: 60.0,
    RateLimitType.PER_HOUR: 3600.0,
    RateLimitType.PER_DAY: 86400.0,
}


class QuotaPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A quota: at most ``limit`` units per ``period`` seconds (windows start at session creation)."""

    limit: Annotated[float, msgspec.Meta(ge=0)]
    period: Seconds = 86400.0


class RateLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Requests allowed in any sliding window of each length; None (absent) means unlimited."""

    per_second: Count | None = None
    per_minute: Count | None = None
    per_hour: Count | None = None
    per_day: Count | None = None

    def limit(self, window: RateLimitType) -> int | None:
        # the field named by the window's value: int | None, which getattr cannot tell mypy
        return getattr(self, window.value)  # type: ignore[no-any-return]


class ConcurrencyPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Concurrent operations (leased slots): per operation (``default`` or named) and in total."""

    total: Count = 10
    default: Count = 5
    operations: dict[str, Count] = {}
    lease_seconds: Seconds = 300.0  # a holder that never releases loses its slot after this

    def limit(self, operation: str) -> int:
        return self.operations.get(operation, self.default)


class RatePolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default: RateLimits = RateLimits()
    operations: dict[str, RateLimits] = {}

    def for_operation(self, operation: str) -> RateLimits:
        return self.operations.get(operation, self.default)


class MemoryPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Memory per tier: cache capacity (entries per scope), retention per memory kind
    (``default`` for the rest; absent: kept until deleted), what is redacted before anything is
    written, and the near-duplicate threshold (cosine similarity)."""

    cache_entries: Count = 1000
    retention: dict[str, Seconds] = {}
    redact: tuple[str, ...] = ("email", "phone", "card")
    duplicate_threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.95

    def retention_for(self, kind: str) -> float | None:
        return self.retention.get(kind, self.retention.get("default"))


class TierPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one tier grants: lifetime limits, quotas, rate limits, concurrency, priority."""

    idle_timeout: Seconds
    max_age: Seconds
    max_sessions_per_user: Annotated[int, msgspec.Meta(ge=1)] = 10
    priority: int = 0
    quotas: dict[QuotaType, QuotaPolicy] = {}
    rate_limits: RatePolicy = RatePolicy()
    concurrency: ConcurrencyPolicy = ConcurrencyPolicy()
    memory: MemoryPolicy = MemoryPolicy()


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A versioned set of tier policies. Every session records the version it was created under."""

    version: Annotated[int, msgspec.Meta(ge=1)]
    tiers: dict[str, TierPolicy]

    def tier(self, name: str) -> TierPolicy | None:
        return self.tiers.get(name)


class PolicyError(ValueError):
    """A policy document is malformed; ``path`` names the offending field (``tiers.pro.quotas...``)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def _parts(document: dict[str, Any]) -> list[tuple[str, Any, type]]:
    """Every keyed part of a policy document with its type, innermost first: msgspec names a
    dict key only as ``[...]``, so each is validated on its own to name it."""
    parts: list[tuple[str, Any, type]] = []
    tiers = document.get("tiers")
    for name, tier in tiers.items() if isinstance(tiers, dict) else ():
        if isinstance(tier, dict):
            quotas = tier.get("quotas")
            for key, rule in quotas.items() if isinstance(quotas, dict) else ():
                parts.append((f"tiers.{name}.quotas.{key}", rule, QuotaPolicy))
            rates = tier.get("rate_limits")
            operations = rates.get("operations") if isinstance(rates, dict) else None
            for op, limits in operations.items() if isinstance(operations, dict) else ():
                parts.append((f"tiers.{name}.rate_limits.operations.{op}", limits, RateLimits))
        parts.append((f"tiers.{name}", tier, TierPolicy))
    parts.append(("", document, Policy))
    return parts


def policy_from_document(document: Any) -> Policy:
    """A Policy from a decoded document (TOML or a dict). Raises :class:`PolicyError` whose
    ``path`` names the first wrong field."""
    if not isinstance(document, dict):
        raise PolicyError(f"invalid tier policy: expected a table, got {type(document).__name__}")
    for prefix, part, kind in _parts(document):
        try:
            msgspec.convert(part, kind)
        except msgspec.ValidationError as exc:
            text = str(exc)
            message, _, where = text.rpartition(" - at `$")
            if not _:
                message, where = text, ""
            path = (prefix + where.rstrip("`")).lstrip(".")
            raise PolicyError(f"invalid tier policy: {message} - at `{path or '$'}`", path) from None
    policy = msgspec.convert(document, Policy)
    if not policy.tiers:
        raise PolicyError("invalid tier policy: at least one tier is required - at `tiers`", "tiers")
    return policy


def load_policy(text: str | bytes) -> Policy:
    """Parse a TOML policy document. Raises :class:`PolicyError` naming the bad field."""
    try:
        document = msgspec.toml.decode(text)
    except msgspec.DecodeError as exc:
        raise PolicyError(f"tier policy is not valid TOML: {exc}") from None
    return policy_from_document(document)


def default_policy() -> Policy:
    """The packaged default policy (free, basic, pro, enterprise)."""
    return load_policy(resources.files(__package__).joinpath("tiers.toml").read_bytes())
