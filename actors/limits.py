"""The types the limit rules read: a session's metering state and its live limit adjustments.

They live below :mod:`actors.quota`, :mod:`actors.session` and :mod:`actors.tenant`, which all
use them, so those three import one another in one direction only: ``session`` uses ``quota``
and ``tenant``; ``quota`` reads a session through :class:`QuotaView` without importing
``session``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

#: quota value -> (limit, until or None for "until changed again"): a live adjustment of a
#: quota's limit, a session's own (``QuotaAdjusted``) or a user's (``UserQuotaAdjusted``)
Boosts = Mapping[str, tuple[float, float | None]]
NO_BOOSTS: Boosts = {}


class QuotaView(Protocol):
    """What a quota or rate-limit report reads of a session.

    Both the session aggregate's ``SessionState`` and the API's ``SessionView`` have it, so a
    report can be made from either. Times are seconds since the epoch.
    """

    @property
    def session_id(self) -> str: ...

    @property
    def created_at(self) -> float: ...  # quota windows are aligned to it

    @property
    def usage(self) -> Mapping[str, tuple[float, float]]: ...  # quota -> (window_start, used)

    @property
    def rate_logs(self) -> Mapping[str, bytes]: ...  # "operation/window" -> packed times

    @property
    def leases(self) -> Mapping[str, tuple[str, float, int]]: ...  # id -> (op, expires, token)

    @property
    def reservations(self) -> Mapping[str, tuple[str, Mapping[str, float], float]]: ...
    # reservation id -> (operation, amounts held, expires_at)

    @property
    def boosts(self) -> Boosts: ...


class QuotaState(QuotaView, Protocol):
    """What a quota decision reads of a session: the report's fields and the last fencing token
    granted, which numbers the next lease or reservation (``SessionState`` has it)."""

    @property
    def fencing(self) -> int: ...
