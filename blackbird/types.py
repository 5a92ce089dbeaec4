"""Public value types: Session and SessionStatus."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from actors.events import SessionStatus, SessionView

from actors.policy import QuotaType

__all__ = ["Session", "SessionStatus", "UsageRecord"]


class UsageRecord(msgspec.Struct, frozen=True):
    """One tracked usage, as given to usage callbacks."""

    session_id: str
    user_id: str
    tenant: str
    operation: str
    resource_type: QuotaType
    amount: float
    metadata: dict[str, Any]
    timestamp: float


class Session(SessionView, frozen=True):
    """A session as of the moment it was read (fields from :class:`SessionView`, times in seconds
    since the epoch). Time-derived properties use the current clock."""

    @classmethod
    def from_view(cls, view: SessionView) -> Session:
        return cls(*(getattr(view, f) for f in view.__struct_fields__))

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.created_at)

    @property
    def idle_seconds(self) -> float:
        return max(0.0, time.time() - self.last_activity)

    @property
    def is_active(self) -> bool:
        """Active, not terminated, within its idle timeout and maximum age."""
        return (
            self.status is SessionStatus.ACTIVE
            and self.idle_seconds < self.idle_timeout
            and self.age_seconds < self.max_age
        )

    @property
    def effective_status(self) -> SessionStatus:
        """``status`` with lapsed time limits applied (an active session past them is expired)."""
        if self.status is SessionStatus.ACTIVE and not self.is_active:
            return SessionStatus.EXPIRED
        return self.status

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the session, including the derived fields."""
        data = msgspec.to_builtins(self)
        del data["rate_logs"]  # internal packed timestamps; see get_rate_limits()
        data["status"] = self.effective_status.value
        data["is_active"] = self.is_active
        data["age_seconds"] = self.age_seconds
        data["idle_seconds"] = self.idle_seconds
        return data
