"""Abuse and anomaly detection: a pure fold of the log's commits into alerts.

Three detectors, each kept apart per tenant:

* ``usage_spike`` — per session and per user, per resource type, usage is summed in fixed
  buckets of ``bucket_seconds``. A bucket whose rate (amount per second) exceeds
  ``spike_factor`` times the baseline (an EWMA of the rates of earlier buckets, floored at
  ``min_rate``) trips it, once the baseline holds ``min_buckets`` buckets. Buckets without
  usage are skipped rather than folded in as zeros: agents work in bursts between pauses, and
  a baseline that decayed during every pause would flag every resumption. Usage only adds up,
  so the alert is raised at the commit whose usage crosses the threshold (the bucket could
  only end higher); ``value`` is then the bucket's rate so far, not its final rate.
* ``denial_burst`` — ``denial_burst`` denials (RateDenied, QuotaDenied, SlotDenied) of one
  session within ``denial_window`` seconds.
* ``session_burst`` — ``session_burst`` sessions created by one user within ``session_window``.

An alert is not raised again for the same (tenant, kind, user, session) within
``cooldown_seconds``; a session's usage spike also stands for its user's, so the user-level
spike alert (``session_id`` None) is raised only for usage no single session explains.

Time is the log's own: the detector's clock is the largest ``commit.at`` seen so far, so it
never runs backwards and a commit from a host whose clock lags counts at the clock's time.
Host clocks are assumed synchronised: one far ahead of the others moves every bucket and
window forward for all.

The state keeps only what the windows need: at most ``denial_burst`` / ``session_burst``
timestamps per session / user, one open bucket and an EWMA per meter. A session is forgotten
``retain_seconds`` after it can no longer act (its idle timeout or maximum age, both from its
SessionCreated and TierChanged events) or as soon as it is terminated or expired; a user is
forgotten ``retain_seconds`` after the last activity of their last session (and once their
windows and cooldowns are over). Usage or denials of a session the state does not know (its
SessionCreated came before the state began, or it was forgotten) cannot be attributed to a
user and are ignored.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import msgspec

from actors.events import (
    Commit,
    QuotaDenied,
    RaiseAlert,
    RateDenied,
    SessionCreated,
    SessionExpired,
    SessionTerminated,
    SlotDenied,
    TierChanged,
    UsageTracked,
)

__all__ = [
    "DENIAL_BURST",
    "SESSION_BURST",
    "USAGE_SPIKE",
    "AbuseConfig",
    "AbuseProjection",
    "AbuseState",
    "Alert",
    "observe",
]

USAGE_SPIKE = "usage_spike"
DENIAL_BURST = "denial_burst"
SESSION_BURST = "session_burst"

_DENIALS = (RateDenied, QuotaDenied, SlotDenied)


class AbuseConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The detectors' thresholds. Durations are in seconds, rates in resource units per second
    (one ``min_rate`` for every resource type: tune it to the units that matter most).

    Raises ``ValueError`` naming the field when a value is out of range (``msgspec`` reports it
    as a ``ValidationError`` when the config is decoded)."""

    bucket_seconds: float = 60.0
    ewma_alpha: float = 0.3  # weight of the newest bucket in the baseline, in (0, 1]
    spike_factor: float = 5.0
    min_buckets: int = 3  # buckets with usage before a baseline is trusted
    min_rate: float = 1.0  # floor under the baseline: light use of a near-idle meter is no spike
    denial_burst: int = 20
    denial_window: float = 60.0
    session_burst: int = 10
    session_window: float = 300.0
    cooldown_seconds: float = 600.0  # the same (kind, user, session) is not raised again within it
    # how long a session or user is kept past its last possible activity: a margin for lagging
    # clocks, and how long a returning user's baseline survives
    retain_seconds: float = 3600.0

    def __post_init__(self) -> None:
        positive = {
            "bucket_seconds": self.bucket_seconds,
            "spike_factor": self.spike_factor,
            "denial_window": self.denial_window,
            "session_window": self.session_window,
        }
        for name, value in positive.items():
            if not value > 0:  # also refuses NaN
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        not_negative = {
            "min_rate": self.min_rate,
            "min_buckets": self.min_buckets,
            "cooldown_seconds": self.cooldown_seconds,
            "retain_seconds": self.retain_seconds,
        }
        for name, value in not_negative.items():
            if not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha: expected a number in (0, 1], got {self.ewma_alpha!r}")
        for name, count in (
            ("denial_burst", self.denial_burst),
            ("session_burst", self.session_burst),
        ):
            if count < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {count!r}")


class _Meter(msgspec.Struct, array_like=True, gc=False):
    """One resource's usage by one session or user: the open bucket and the baseline."""

    bucket: int = -1  # index of the open bucket, floor(time / bucket_seconds); -1: none yet
    amount: float = 0.0  # used in the open bucket so far
    tripped: bool = False  # the open bucket has already been judged a spike
    baseline: float = 0.0  # EWMA of the rates of the earlier buckets with usage
    buckets: int = 0  # how many buckets the baseline has folded in


class _Session(msgspec.Struct, array_like=True):
    user_id: str
    created_at: float
    last_seen: float
    idle_timeout: float
    max_age: float
    meters: dict[str, _Meter] = {}  # resource type -> meter
    denials: list[float] = []  # times of the latest denials, at most denial_burst of them
    alerted: dict[str, float] = {}  # alert kind -> when it was last raised (the cooldown)


class _User(msgspec.Struct, array_like=True):
    sessions: int = 0  # how many of the user's sessions the state holds
    last_seen: float = 0.0
    meters: dict[str, _Meter] = {}
    created: list[float] = []  # times of the latest session creations, at most session_burst
    alerted: dict[str, float] = {}


class _Tenant(msgspec.Struct, array_like=True):
    sessions: dict[str, _Session] = {}
    users: dict[str, _User] = {}


class AbuseState(msgspec.Struct):
    """Everything the detector remembers. Start from ``AbuseState()``; snapshot it with
    ``msgspec.msgpack.encode`` and restore it with ``msgspec.msgpack.decode(data,
    type=AbuseState)``: folding on from a restored snapshot gives the same alerts and state as
    never having stopped."""

    clock: float = 0.0  # the largest commit.at seen so far
    tenants: dict[str, _Tenant] = {}
    # a heap of (deadline, tenant, "session" | "user", id): when to check whether to forget one
    timers: list[tuple[float, str, str, str]] = []


class Alert(msgspec.Struct, frozen=True):
    """One tripped detector: raise it on the user's aggregate with :meth:`command` under
    :attr:`command_id`."""

    tenant: str
    user_id: str
    session_id: str | None  # None: about the user as a whole
    kind: str  # USAGE_SPIKE | DENIAL_BURST | SESSION_BURST
    detail: str
    value: float  # the observed figure: a rate (units/s) or a count
    threshold: float  # what the value exceeded (a rate) or reached (a count)
    trigger_seq: int  # stream sequence of the commit that tripped it
    at: float  # the detector's clock when it tripped

    def command(self) -> RaiseAlert:
        """The RaiseAlert command for the actor of ``bb.<tenant>.user.<user_id>``."""
        return RaiseAlert(
            kind=self.kind,
            session_id=self.session_id,
            detail=self.detail,
            value=self.value,
            threshold=self.threshold,
            trigger_seq=self.trigger_seq,
        )

    @property
    def command_id(self) -> str:
        """Derived from the alert alone, so workers folding the same log raise it once (the user
        actor deduplicates by command id)."""
        return f"alert:{self.kind}:{self.trigger_seq}:{self.session_id or '-'}"


def observe(
    state: AbuseState, config: AbuseConfig, seq: int, subject: str, commit: Commit
) -> list[Alert]:
    """Fold one commit into ``state`` (mutating it in place) and return the alerts it trips.

    Feed every commit of the stream once, in stream order; ``seq`` is its stream sequence and
    ``subject`` its subject (``<prefix>.<tenant>.session.<id>``, ``.user.<id>``, ``.tenant``).
    Every commit advances the clock; only session commits carry what the detectors count.
    The result depends only on the commits fed so far and ``config`` (keep it unchanged
    across a snapshot).
    """
    now = state.clock = max(state.clock, commit.at)
    _forget_idle(state, config, now)
    tokens = subject.split(".")
    if len(tokens) < 4 or tokens[2] != "session":
        return []
    origin = _Origin(seq, tokens[1], tokens[3], now)
    alerts: list[Alert] = []
    for applied in commit.commands:
        for event in applied.events:
            if isinstance(event, SessionCreated):
                alerts.extend(_session_created(state, config, origin, event))
                continue
            tenant = state.tenants.get(origin.tenant)
            session = tenant.sessions.get(origin.session_id) if tenant is not None else None
            if tenant is None or session is None:
                continue  # unknown session: no user to attribute it to
            user = tenant.users[session.user_id]
            session.last_seen = user.last_seen = now
            if isinstance(event, UsageTracked):
                if event.amount > 0:
                    alerts.extend(_usage(config, origin, session, user, event))
            elif isinstance(event, _DENIALS):
                alerts.extend(_denial(config, origin, session, event))
            elif isinstance(event, TierChanged):
                session.idle_timeout, session.max_age = event.idle_timeout, event.max_age
            elif isinstance(event, (SessionTerminated, SessionExpired)):
                _forget_session(state, config, origin.tenant, tenant, origin.session_id)
    return alerts


# --------------------------------------------------------------------------- detectors


class _Origin(NamedTuple):
    """The commit being folded: what every alert it trips cites."""

    seq: int
    tenant: str
    session_id: str
    now: float

    def alert(
        self,
        kind: str,
        user_id: str,
        about_session: bool,
        detail: str,
        value: float,
        threshold: float,
    ) -> Alert:
        return Alert(
            tenant=self.tenant,
            user_id=user_id,
            session_id=self.session_id if about_session else None,
            kind=kind,
            detail=detail,
            value=float(value),
            threshold=float(threshold),
            trigger_seq=self.seq,
            at=self.now,
        )


def _session_created(
    state: AbuseState, config: AbuseConfig, origin: _Origin, event: SessionCreated
) -> list[Alert]:
    tenant = state.tenants.setdefault(origin.tenant, _Tenant())
    if origin.session_id in tenant.sessions:
        return []  # the session aggregate never creates a session twice
    now = origin.now
    session = tenant.sessions[origin.session_id] = _Session(
        user_id=event.user_id,
        created_at=now,
        last_seen=now,
        idle_timeout=event.idle_timeout,
        max_age=event.max_age,
    )
    deadline = _session_deadline(session, config)
    heapq.heappush(state.timers, (deadline, origin.tenant, "session", origin.session_id))
    user = tenant.users.setdefault(event.user_id, _User())
    user.sessions += 1
    user.last_seen = now
    count = _count_within(user.created, now, config.session_window, config.session_burst)
    if count < config.session_burst or not _cooled(user.alerted, SESSION_BURST, now, config):
        return []
    user.alerted[SESSION_BURST] = now
    detail = (
        f"user {event.user_id!r} created {count} sessions in {now - user.created[0]:.1f} s "
        f"(window {config.session_window:g} s), the latest {origin.session_id!r}"
    )
    return [origin.alert(SESSION_BURST, event.user_id, False, detail, count, config.session_burst)]


def _usage(
    config: AbuseConfig, origin: _Origin, session: _Session, user: _User, event: UsageTracked
) -> list[Alert]:
    alerts = []
    now, resource = origin.now, event.resource_type
    # The session first: a session's spike alert stamps the user's cooldown, so the user-level
    # alert (which would repeat it) waits out the cooldown, and is never raised in the same bucket.
    meter = session.meters.setdefault(resource, _Meter())
    threshold = _meter(meter, config, now, event.amount)
    if threshold is not None and _cooled(session.alerted, USAGE_SPIKE, now, config):
        session.alerted[USAGE_SPIKE] = user.alerted[USAGE_SPIKE] = now
        where = f"session {origin.session_id!r}"
        alerts.append(
            _spike(config, origin, session.user_id, True, where, resource, meter, threshold)
        )
    meter = user.meters.setdefault(resource, _Meter())
    threshold = _meter(meter, config, now, event.amount)
    last = user.alerted.get(USAGE_SPIKE)
    explained = last is not None and math.floor(last / config.bucket_seconds) == meter.bucket
    if threshold is not None and not explained and _cooled(user.alerted, USAGE_SPIKE, now, config):
        user.alerted[USAGE_SPIKE] = now
        where = f"user {session.user_id!r} across sessions (last {origin.session_id!r})"
        alerts.append(
            _spike(config, origin, session.user_id, False, where, resource, meter, threshold)
        )
    return alerts


def _meter(meter: _Meter, config: AbuseConfig, now: float, amount: float) -> float | None:
    """Add ``amount`` (> 0) used at ``now``; return the threshold the open bucket's rate has
    just crossed, if it has (once per bucket), else None."""
    bucket = math.floor(now / config.bucket_seconds)
    if bucket != meter.bucket:  # the clock never runs backwards: the open bucket is over
        if meter.bucket >= 0:
            rate = meter.amount / config.bucket_seconds
            alpha = config.ewma_alpha
            meter.baseline = (
                rate if meter.buckets == 0 else alpha * rate + (1 - alpha) * meter.baseline
            )
            meter.buckets += 1
        meter.bucket, meter.amount, meter.tripped = bucket, 0.0, False
    meter.amount += amount
    if meter.tripped or meter.buckets < config.min_buckets:
        return None
    threshold = config.spike_factor * max(meter.baseline, config.min_rate)
    if meter.amount / config.bucket_seconds <= threshold:
        return None
    meter.tripped = True  # judged: later usage in this bucket cannot trip it again
    return threshold


def _spike(
    config: AbuseConfig,
    origin: _Origin,
    user_id: str,
    about_session: bool,
    where: str,
    resource: str,
    meter: _Meter,
    threshold: float,
) -> Alert:
    rate = meter.amount / config.bucket_seconds
    detail = (
        f"{where} used {meter.amount:.6g} {resource} in a {config.bucket_seconds:g} s bucket "
        f"so far ({rate:.4g}/s), over {config.spike_factor:g}x its baseline of "
        f"{meter.baseline:.4g}/s ({meter.buckets} buckets)"
    )
    return origin.alert(USAGE_SPIKE, user_id, about_session, detail, rate, threshold)


def _denial(
    config: AbuseConfig,
    origin: _Origin,
    session: _Session,
    event: RateDenied | QuotaDenied | SlotDenied,
) -> list[Alert]:
    now = origin.now
    count = _count_within(session.denials, now, config.denial_window, config.denial_burst)
    if count < config.denial_burst or not _cooled(session.alerted, DENIAL_BURST, now, config):
        return []
    session.alerted[DENIAL_BURST] = now
    detail = (
        f"session {origin.session_id!r} was denied {count} times in "
        f"{now - session.denials[0]:.1f} s (window {config.denial_window:g} s), the latest a "
        f"{type(event).__name__} of {event.operation!r}"
    )
    return [origin.alert(DENIAL_BURST, session.user_id, True, detail, count, config.denial_burst)]


def _count_within(times: list[float], now: float, window: float, keep: int) -> int:
    """Record an occurrence at ``now`` in ``times`` (oldest first, the latest ``keep`` kept)
    and return how many of them are less than ``window`` seconds old."""
    times.append(now)
    if len(times) > keep:
        del times[: len(times) - keep]
    while now - times[0] >= window:
        del times[0]
    return len(times)


def _cooled(alerted: dict[str, float], kind: str, now: float, config: AbuseConfig) -> bool:
    last = alerted.get(kind)
    return last is None or now - last >= config.cooldown_seconds


# --------------------------------------------------------------------------- forgetting


def _session_deadline(session: _Session, config: AbuseConfig) -> float:
    can_act_until = min(
        session.last_seen + session.idle_timeout, session.created_at + session.max_age
    )
    return can_act_until + config.retain_seconds


def _user_deadline(user: _User, config: AbuseConfig) -> float:
    deadline = user.last_seen + config.retain_seconds
    if user.created:
        deadline = max(deadline, user.created[-1] + config.session_window)
    for at in user.alerted.values():
        deadline = max(deadline, at + config.cooldown_seconds)
    return deadline


def _forget_idle(state: AbuseState, config: AbuseConfig, now: float) -> None:
    """Forget the sessions and users whose time is up; a timer whose entity was active since
    is pushed again at its new deadline (checked lazily, so activity costs no heap work)."""
    timers = state.timers
    while timers and timers[0][0] <= now:
        _, tenant_id, kind, key = heapq.heappop(timers)
        tenant = state.tenants.get(tenant_id)
        if tenant is None:
            continue
        if kind == "session":
            session = tenant.sessions.get(key)
            if session is None:
                continue  # terminated or expired, already forgotten
            deadline = _session_deadline(session, config)
            if deadline > now:
                heapq.heappush(timers, (deadline, tenant_id, kind, key))
            else:
                _forget_session(state, config, tenant_id, tenant, key)
        else:
            user = tenant.users.get(key)
            if user is None or user.sessions > 0:
                continue  # forgotten already, or back: its last session's end pushes a new timer
            deadline = _user_deadline(user, config)
            if deadline > now:
                heapq.heappush(timers, (deadline, tenant_id, kind, key))
            else:
                del tenant.users[key]
                if not tenant.users:  # a tenant's sessions all belong to its users
                    del state.tenants[tenant_id]


def _forget_session(
    state: AbuseState, config: AbuseConfig, tenant_id: str, tenant: _Tenant, session_id: str
) -> None:
    session = tenant.sessions.pop(session_id)
    user = tenant.users[session.user_id]
    user.sessions -= 1
    if user.sessions == 0:
        heapq.heappush(
            state.timers, (_user_deadline(user, config), tenant_id, "user", session.user_id)
        )


class AbuseProjection:
    """The detector as a projection (see :mod:`projections.runner`): its effects are alerts."""

    name = "abuse"
    model_type = AbuseState

    def __init__(self, config: AbuseConfig | None = None) -> None:
        self.config = config or AbuseConfig()

    def initial(self) -> AbuseState:
        return AbuseState()

    def apply(self, model: AbuseState, seq: int, subject: str, commit: Commit) -> list[Alert]:
        return observe(model, self.config, seq, subject, commit)
