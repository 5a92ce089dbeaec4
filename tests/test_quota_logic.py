"""Quota, rate-limit, concurrency and admission rules: pure decide()/evolve(), no I/O.

The property tests compare decide() with small reference models written the obvious way.
"""

from __future__ import annotations

import bisect
import math

import msgspec
import pytest
from hypothesis import event as count_case
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import ratelog
from actors import tenant as tenant_logic
from actors.events import (
    AcquireSlot,
    AdjustQuota,
    AdjustUserQuota,
    Admit,
    Applied,
    ChangeTier,
    CheckRate,
    Commit,
    CreateSession,
    Decision,
    GetSession,
    QuotaDenied,
    RateAllowed,
    RateDenied,
    ReleaseSlot,
    ReservationReleased,
    Reserved,
    SessionCommand,
    SetTenantPolicy,
    Settle,
    SlotAcquired,
    SlotDenied,
    SlotExpired,
    TrackUsage,
    UsageTracked,
)
from actors.policy import PolicyError, QuotaType, RateLimitType, load_policy
from actors.quota import quota_info, rate_status
from actors.session import (
    SessionState,
    apply_commands,
    apply_commit,
    decide,
    evolve,
    fold,
    initial_state,
)

T0 = 1_700_000_000.0

POLICY = load_policy(
    """
version = 7
[tiers.small]
idle_timeout = 1e9
max_age = 1e9
quotas.tokens = { limit = 100, period = 3600 }
quotas.api_calls = { limit = 5, period = 60 }
rate_limits.default = { per_second = 3, per_minute = 10 }
rate_limits.operations.search = { per_minute = 2 }
concurrency = { total = 3, default = 2, operations = { render = 1 }, lease_seconds = 30 }

[tiers.big]
idle_timeout = 1e9
max_age = 1e9
quotas.tokens = { limit = 1000, period = 3600 }
rate_limits.default = { per_minute = 100 }
concurrency = { total = 10, default = 5 }
"""
)


def created(tier: str = "small") -> SessionState:
    state = initial_state("acme", "s1")
    d = decide(state, CreateSession(user_id="u1", tier=tier), T0, POLICY)
    return apply_commands(state, (Applied("c0", "test", d.events),))


def run(state: SessionState, command: SessionCommand, now: float, **kw: object) -> tuple[SessionState, Decision]:
    """Decide, then apply what was decided (as the host does)."""
    d = decide(state, command, now, POLICY, **kw)  # type: ignore[arg-type]
    for event in d.events:
        state = evolve(state, event)
    return state, d


# --------------------------------------------------------------------------- the rate log


def admitted_by_exact_log(times: list[float], limit: int, window: float) -> list[float]:
    """Reference: admit at t iff fewer than ``limit`` admissions lie in (t - window, t]."""
    admitted: list[float] = []
    for t in times:
        if sum(1 for a in admitted if a > t - window) < limit:
            admitted.append(t)
    return admitted


def admitted_by_ratelog(times: list[float], limit: int, window: float) -> list[float]:
    log, admitted = b"", []
    for t in times:
        if ratelog.retry_after(log, t, window, limit) == 0.0:
            log = ratelog.record(log, t, window)
            admitted.append(t)
    return admitted


def made_room(times: list[float], limit: int, window: float) -> bool:
    """Whether some request was admitted only because entries had left the window (the log held
    ``limit`` or more admissions, counting expired ones, yet had room)."""
    log = b""
    for t in times:
        if ratelog.retry_after(log, t, window, limit) == 0.0:
            if sum(n for _, n in ratelog.entries(log)) >= limit > 0:
                return True
            log = ratelog.record(log, t, window)
    return False


def max_in_any_window(admitted: list[float], window: float) -> int:
    """The most admissions in any ``(t - window, t]`` ending at an admission (``admitted`` is in
    time order: counted by bisection, as the long arrival lists make a quadratic count slow)."""
    return max(
        (bisect.bisect_right(admitted, t) - bisect.bisect_right(admitted, t - window) for t in admitted), default=0
    )


# Arrival times on a tick of 1/256 of the window, so bursts inside one 1/64th of a window and
# arrivals exactly one window after earlier ones (where an undercount would show) are common.
# Half the lists are long: an entry only makes room once ``limit`` admissions are in the log and a
# window (256 ticks) has passed, which short lists (a handful of arrivals) seldom reach.
tick = st.one_of(st.integers(0, 3), st.integers(0, 300), st.sampled_from([255, 256, 257]))
ticks = st.one_of(st.lists(tick, min_size=1, max_size=20), st.lists(tick, min_size=40, max_size=250))


@settings(max_examples=400, deadline=None)
@given(ticks=ticks, limit=st.integers(min_value=0, max_value=12), window=st.sampled_from([1.0, 60.0, 86400.0]))
def test_no_window_anywhere_holds_more_than_the_limit(ticks: list[int], limit: int, window: float) -> None:
    times = [T0 + sum(ticks[: i + 1]) * window / 256 for i in range(len(ticks))]
    admitted = admitted_by_ratelog(times, limit, window)
    count_case("expired entries made room" if made_room(times, limit, window) else "no entry had to expire")
    assert max_in_any_window(admitted, window) <= limit


def test_a_merged_burst_counts_until_its_last_admission_leaves() -> None:
    # window 64 s: one bucket is 1 s. Admissions at 0.0 and 0.9 share a bucket.
    log = ratelog.record(ratelog.record(b"", 0.0, 64.0), 0.9, 64.0)
    assert ratelog.count(log, 64.5, 64.0) >= 1  # 0.9 is still inside (0.5, 64.5]
    # A log of every timestamp would admit 64.5 (only 0.9 is inside); the merged entry holds
    # both until 64.9: conservative by less than one bucket, never over the limit.
    assert admitted_by_exact_log([0.0, 0.9, 64.5, 64.6], 2, 64.0) == [0.0, 0.9, 64.5]
    assert admitted_by_ratelog([0.0, 0.9, 64.5, 64.6], 2, 64.0) == [0.0, 0.9]
    assert admitted_by_ratelog([0.0, 0.9, 64.95], 2, 64.0) == [0.0, 0.9, 64.95]


# Seconds between arrivals, at least 1/32 s (two per 1/64th of a 1 s window would merge); short
# gaps (two draws in three) fill the window up to its limit, long ones let entries expire.
gap = st.one_of(
    st.floats(min_value=1.0 / 32, max_value=0.1),
    st.floats(min_value=1.0 / 32, max_value=0.1),
    st.floats(min_value=0.1, max_value=2.0),
)


@settings(max_examples=200, deadline=None)
@given(
    # mostly gaps short enough for the limit to bind within the 1 s window, some long ones to empty
    # it; half the lists long enough for both to happen
    gaps=st.lists(gap, min_size=1, max_size=10) | st.lists(gap, min_size=20, max_size=80),
    limit=st.integers(min_value=1, max_value=10),
)
def test_sparse_traffic_is_counted_exactly(gaps: list[float], limit: int) -> None:
    # At most one request per 1/64th of the window: no merging, so exactly the reference log.
    window = 1.0
    times = [T0 + sum(gaps[: i + 1]) for i in range(len(gaps))]
    admitted = admitted_by_ratelog(times, limit, window)
    count_case("expired entries made room" if made_room(times, limit, window) else "no entry had to expire")
    assert admitted == admitted_by_exact_log(times, limit, window)
    log = b""  # and the count it reports (rate_status's "remaining") leaves out exactly what expired
    for t in times:
        assert ratelog.count(log, t, window) == sum(1 for a in admitted if t - window < a < t)
        if t in admitted:
            log = ratelog.record(log, t, window)


def test_the_log_stays_small_however_large_the_limit() -> None:
    log = b""
    for i in range(100_000):
        log = ratelog.record(log, T0 + i * 0.01, 86400.0)
    assert ratelog.count(log, T0 + 1000, 86400.0) == 100_000
    assert len(ratelog.entries(log)) <= ratelog.GRID + 1


def test_retry_after_is_when_the_oldest_blocking_admission_leaves() -> None:
    log = b""
    for t in (0.0, 10.0, 20.0):
        log = ratelog.record(log, T0 + t, 60.0)
    assert ratelog.retry_after(log, T0 + 30, 60.0, 3) == pytest.approx(30.0)
    assert ratelog.retry_after(log, T0 + 30, 60.0, 2) == pytest.approx(40.0)
    assert ratelog.retry_after(log, T0 + 30, 60.0, 4) == 0.0
    assert ratelog.retry_after(b"", T0, 60.0, 0) == 60.0


# --------------------------------------------------------------------------- rate decisions


def test_twice_the_limit_across_a_window_boundary_is_impossible() -> None:
    # 10 per minute: 10 requests in the last second of one minute, then more in the first
    # seconds of the next. A fixed-window counter would admit 10 more; a sliding one none.
    state = created()
    late = T0 + 59.0
    for i in range(10):
        state, d = run(state, CheckRate(operation="chat", limit_type=RateLimitType.PER_MINUTE), late + i * 0.05)
        assert d.rejection is None
    for t in (T0 + 60.0, T0 + 61.0, T0 + 100.0, late + 59.9):
        state, d = run(state, CheckRate(operation="chat", limit_type=RateLimitType.PER_MINUTE), t)
        assert d.rejection is not None and d.rejection.code == "rate_limited"
        assert isinstance(d.events[-1], RateDenied)
        assert d.rejection.fields["retry_after"] > 0
    # once the burst has slid out of the window (up to 1/64 of it later), requests pass again
    state, d = run(state, CheckRate(operation="chat", limit_type=RateLimitType.PER_MINUTE), late + 0.5 + 60 + 60 / 64)
    assert d.rejection is None


def test_every_window_is_checked_and_the_first_full_one_refuses() -> None:
    state = created()
    for i in range(3):
        state, d = run(state, CheckRate(operation="chat"), T0 + 1 + i * 0.01)
        assert d.rejection is None and isinstance(d.events[0], RateAllowed)
        assert d.events[0].windows == ("per_second", "per_minute")
    state, d = run(state, CheckRate(operation="chat"), T0 + 1.5)
    assert d.rejection is not None and d.rejection.fields["limit_type"] == "per_second"
    assert d.rejection.fields["limit"] == 3
    assert 0 < d.rejection.fields["retry_after"] <= 1.0


def test_named_operations_have_their_own_limits() -> None:
    state = created()
    for i in range(2):
        state, d = run(state, CheckRate(operation="search"), T0 + i * 2)
        assert d.rejection is None
    state, d = run(state, CheckRate(operation="search"), T0 + 5)
    assert d.rejection is not None and d.rejection.fields["limit"] == 2
    state, d = run(state, CheckRate(operation="chat"), T0 + 5)  # default limits, own log
    assert d.rejection is None


def test_rate_status_reports_limit_remaining_and_reset() -> None:
    state = created()
    state, _ = run(state, CheckRate(operation="search"), T0)
    status = rate_status(state, POLICY.tiers["small"], T0 + 1)
    assert status["search"]["per_minute"] == {"limit": 2, "remaining": 1, "reset_at": T0 + 1}
    assert status["default"]["per_second"]["remaining"] == 3


def test_denials_record_the_policy_version() -> None:
    state = created()
    for i in range(4):
        state, d = run(state, CheckRate(operation="chat"), T0 + i * 0.01)
    assert isinstance(d.events[-1], RateDenied) and d.events[-1].policy_version == 7


# --------------------------------------------------------------------------- quotas


class QuotaModel:
    """Reference for one quota inside one window: used + held + amount <= limit."""

    def __init__(self, limit: float) -> None:
        self.limit, self.used, self.holds = limit, 0.0, {}  # type: ignore[var-annotated]

    def fits(self, amount: float) -> bool:
        return self.used + sum(self.holds.values()) + amount <= self.limit


op = st.one_of(
    st.tuples(st.just("track"), st.integers(0, 40)),
    st.tuples(st.just("admit"), st.integers(0, 40)),
    st.tuples(st.just("reserve"), st.integers(0, 40)),
    st.tuples(st.just("settle"), st.integers(0, 60)),
    st.tuples(st.just("expire"), st.just(0)),
)
# Half the scripts are long enough to run into the limit of 100 (short ones mostly stay under it).
ops = st.lists(op, max_size=40) | st.lists(op, min_size=12, max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_quota_decisions_match_the_reference_model(ops: list[tuple[str, int]]) -> None:
    model = QuotaModel(100.0)
    state, now = created(), T0 + 1
    refused = False
    for kind, amount in ops:
        now += 0.001
        if kind == "expire":  # unsettled holds lapse (hold_seconds below is 5)
            now += 6
            model.holds.clear()
            continue
        if kind == "settle":
            if not model.holds:
                continue
            rid = next(iter(model.holds))
            state, d = run(state, Settle(reservation_id=rid, actual={QuotaType.TOKENS: amount}), now)
            assert d.rejection is None
            del model.holds[rid]
            model.used += amount  # settling records the real cost, even past the limit
            continue
        fits = model.fits(amount)
        costs = {QuotaType.TOKENS: float(amount)}
        if kind == "track":
            command: SessionCommand = TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=amount)
        else:
            command = Admit(operation="llm", costs=costs, rate=False, slot=False,
                            reserve=kind == "reserve", hold_seconds=5)
        state, d = run(state, command, now)
        assert (d.rejection is None) == fits, (kind, amount, model.used, model.holds)
        if not fits:
            refused = True
            assert d.rejection is not None and d.rejection.code == "quota_exceeded"
            assert isinstance(d.events[-1], QuotaDenied)
        elif kind == "reserve":
            reserved = next(e for e in d.events if isinstance(e, Reserved))
            model.holds[reserved.reservation_id] = amount
        else:
            model.used += amount
    count_case("some refused" if refused else "none refused")
    info = quota_info(state, POLICY.tiers["small"], now)["tokens"]
    assert info["used"] == model.used
    assert info["reserved"] == sum(model.holds.values())


def test_exceeding_a_quota_counts_nothing_and_says_why() -> None:
    state = created()
    state, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=90), T0 + 1)
    state, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=11), T0 + 2)
    assert d.rejection is not None
    f = d.rejection.fields
    assert (f["used"], f["limit"], f["quota_type"], f["resets_at"]) == (90, 100, "tokens", T0 + 3600)
    assert quota_info(state, POLICY.tiers["small"], T0 + 2)["tokens"]["used"] == 90


def test_quota_windows_reset_at_their_period() -> None:
    state = created()
    state, _ = run(state, TrackUsage(operation="op", resource_type=QuotaType.API_CALLS, amount=5), T0 + 1)
    state, d = run(state, TrackUsage(operation="op", resource_type=QuotaType.API_CALLS, amount=1), T0 + 59)
    assert d.rejection is not None
    state, d = run(state, TrackUsage(operation="op", resource_type=QuotaType.API_CALLS, amount=5), T0 + 60)
    assert d.rejection is None
    assert quota_info(state, POLICY.tiers["small"], T0 + 61)["api_calls"]["resets_at"] == T0 + 120


def test_unmetered_resources_are_counted_never_refused() -> None:
    state = created("big")
    state, d = run(state, TrackUsage(operation="x", resource_type=QuotaType.BANDWIDTH, amount=1e12), T0 + 1)
    assert d.rejection is None
    assert quota_info(state, POLICY.tiers["big"], T0 + 1)["bandwidth"]["used"] == 1e12


def test_a_tier_upgrade_applies_its_limits_at_once() -> None:
    state = created("small")
    state, _ = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=100), T0 + 1)
    _, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=1), T0 + 2)
    assert d.rejection is not None
    state, _ = run(state, ChangeTier(tier="big"), T0 + 3)
    state, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=1), T0 + 4)
    assert d.rejection is None


def test_a_boost_lifts_the_limit_until_it_expires_by_itself() -> None:
    state = created()
    state, d = run(state, AdjustQuota(resource_type=QuotaType.TOKENS, limit=500, until=T0 + 100), T0 + 1)
    assert d.rejection is None
    state, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=300), T0 + 2)
    assert d.rejection is None
    _, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=1), T0 + 100)
    assert d.rejection is not None and d.rejection.fields["limit"] == 100  # the boost is over
    _, d = run(state, AdjustQuota(resource_type=QuotaType.TOKENS, limit=5, until=T0), T0 + 2)
    assert d.rejection is not None and d.rejection.fields["field"] == "until"


def test_a_session_adjustment_wins_over_a_user_adjustment_which_wins_over_the_tier() -> None:
    state = created()
    user = {"tokens": (50.0, None)}
    _, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=60), T0 + 1, user_boosts=user)
    assert d.rejection is not None and d.rejection.fields["limit"] == 50
    state, _ = run(state, AdjustQuota(resource_type=QuotaType.TOKENS, limit=70), T0 + 2)
    _, d = run(state, TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=60), T0 + 3, user_boosts=user)
    assert d.rejection is None
    state, _ = run(state, AdjustQuota(resource_type=QuotaType.TOKENS, limit=None), T0 + 4)  # reset
    assert quota_info(state, POLICY.tiers["small"], T0 + 5, user)["tokens"]["limit"] == 50


# --------------------------------------------------------------------------- concurrency


def test_slots_are_limited_per_operation_and_in_total() -> None:
    state = created()
    state, d = run(state, AcquireSlot(operation="render"), T0 + 1)
    assert d.rejection is None
    _, d = run(state, AcquireSlot(operation="render"), T0 + 2)
    assert d.rejection is not None and d.rejection.fields["scope"] == "operation"
    state, _ = run(state, AcquireSlot(operation="a"), T0 + 3)
    state, _ = run(state, AcquireSlot(operation="b"), T0 + 4)
    _, d = run(state, AcquireSlot(operation="c"), T0 + 5)
    assert d.rejection is not None and d.rejection.fields["scope"] == "total"
    assert isinstance(d.events[-1], SlotDenied)


def test_a_lease_that_is_never_released_expires_as_an_event() -> None:
    state = created()
    state, d = run(state, AcquireSlot(operation="render", lease_seconds=10), T0 + 1)
    (lease,) = d.events
    assert isinstance(lease, SlotAcquired)
    _, d = run(state, AcquireSlot(operation="render"), T0 + 10.9)
    assert d.rejection is not None
    state, d = run(state, AcquireSlot(operation="render"), T0 + 11)
    assert d.rejection is None
    expired, granted = d.events
    assert isinstance(expired, SlotExpired) and expired.lease_id == lease.lease_id
    assert isinstance(granted, SlotAcquired) and granted.fencing_token > lease.fencing_token


def test_releasing_is_idempotent_and_frees_the_slot() -> None:
    state = created()
    state, d = run(state, AcquireSlot(operation="render"), T0 + 1)
    lease_id = d.events[0].lease_id  # type: ignore[union-attr]
    state, d = run(state, ReleaseSlot(operation="render", lease_id=lease_id), T0 + 2)
    assert d.rejection is None and len(d.events) == 1 and not state.leases
    state, d = run(state, ReleaseSlot(operation="render", lease_id=lease_id), T0 + 3)
    assert d.rejection is None and d.events == ()


# --------------------------------------------------------------------------- admission


def test_admission_is_all_or_nothing() -> None:
    state = created()
    state, _ = run(state, AcquireSlot(operation="render"), T0 + 1)
    # the slot check fails last: no quota charged, no rate admission recorded
    _, d = run(state, Admit(operation="render", costs={QuotaType.TOKENS: 10}), T0 + 2)
    assert d.rejection is not None and d.rejection.fields["scope"] == "operation"
    assert [type(e) for e in d.events] == [SlotDenied]
    state, d = run(state, Admit(operation="chat", costs={QuotaType.TOKENS: 10, QuotaType.API_CALLS: 1}), T0 + 3)
    assert d.rejection is None
    kinds = [type(e) for e in d.events]
    assert kinds == [UsageTracked, UsageTracked, RateAllowed, SlotAcquired]
    info = quota_info(state, POLICY.tiers["small"], T0 + 3)
    assert (info["tokens"]["used"], info["api_calls"]["used"]) == (10, 1)


def test_an_unsettled_reservation_expires_and_releases_its_hold() -> None:
    state = created()
    admit = Admit(operation="llm", costs={QuotaType.TOKENS: 80}, reserve=True, slot=False, hold_seconds=20)
    state, d = run(state, admit, T0 + 1)
    rid = next(e for e in d.events if isinstance(e, Reserved)).reservation_id
    _, d = run(state, TrackUsage(operation="x", resource_type=QuotaType.TOKENS, amount=30), T0 + 2)
    assert d.rejection is not None  # 80 held + 30 > 100
    state, d = run(state, TrackUsage(operation="x", resource_type=QuotaType.TOKENS, amount=30), T0 + 21)
    assert d.rejection is None
    assert isinstance(d.events[0], ReservationReleased) and d.events[0].reason == "expired"
    _, d = run(state, Settle(reservation_id=rid, actual={QuotaType.TOKENS: 5}), T0 + 22)
    assert d.rejection is not None and d.rejection.code == "reservation_not_found"


def test_settling_charges_the_actual_amount_once() -> None:
    state = created()
    state, d = run(state, Admit(operation="llm", costs={QuotaType.TOKENS: 90}, reserve=True, slot=False), T0 + 1)
    rid = next(e for e in d.events if isinstance(e, Reserved)).reservation_id
    state, d = run(state, Settle(reservation_id=rid, actual={QuotaType.TOKENS: 42}), T0 + 2)
    assert d.rejection is None and [e.amount for e in d.events if isinstance(e, UsageTracked)] == [42]
    info = quota_info(state, POLICY.tiers["small"], T0 + 2)["tokens"]
    assert (info["used"], info["reserved"], info["remaining"]) == (42, 0, 58)
    _, d = run(state, Settle(reservation_id=rid, actual={QuotaType.TOKENS: 42}), T0 + 3)
    assert d.rejection is not None


# --------------------------------------------------------------------------- replay


metered = st.lists(
    st.one_of(
        st.builds(CheckRate, operation=st.sampled_from(["chat", "search"])),
        st.builds(TrackUsage, operation=st.just("llm"), resource_type=st.sampled_from(list(QuotaType)),
                  amount=st.integers(0, 30)),
        st.builds(AcquireSlot, operation=st.sampled_from(["render", "a"]), lease_seconds=st.just(3.0)),
        st.builds(ReleaseSlot, operation=st.sampled_from(["render", "a"])),
        st.builds(Admit, operation=st.just("llm"), costs=st.just({QuotaType.TOKENS: 7.0}),
                  reserve=st.booleans(), hold_seconds=st.just(2.0)),
    ),
    min_size=2,
    max_size=40,
)


def cut_within(length: int) -> st.SearchStrategy[int]:
    """Where to snapshot a log of ``length`` commits: anywhere, ends included, but mostly strictly
    inside (a cut drawn without regard to the length mostly lands past the end: empty tails)."""
    anywhere = st.integers(0, length)
    return st.integers(1, length - 1) | anywhere if length >= 2 else anywhere

@settings(max_examples=150, deadline=None)
@given(commands=metered, step=st.floats(min_value=0.0, max_value=2.0), data=st.data())
def test_snapshot_plus_tail_equals_full_replay(
    commands: list[SessionCommand], step: float, data: st.DataObject
) -> None:
    state, now, commits = created(), T0, []
    for i, command in enumerate(commands):
        now += step
        d = decide(state, command, now, POLICY)
        if d.events:
            c = Commit(at=now, version=state.version + 1, commands=(Applied(f"c{i}", "t", d.events),))
            commits.append(msgspec.json.decode(msgspec.json.encode(c), type=Commit))  # through the wire
            state = apply_commit(state, c)
    full = fold(created(), commits)
    cut = data.draw(cut_within(len(commits)), label="cut")
    snapshot_codec = msgspec.msgpack
    count_case("cut inside the log" if 0 < cut < len(commits) else "cut at an end (empty head or tail)")
    middle = snapshot_codec.decode(snapshot_codec.encode(fold(created(), commits[:cut])), type=SessionState)
    assert fold(middle, commits[cut:]) == full == state


# --------------------------------------------------------------------------- policy


def test_a_wrong_policy_field_is_named() -> None:
    with pytest.raises(PolicyError, match=r">= 0.0 - at `tiers.free.quotas.tokens.limit`") as err:
        load_policy('version = 1\n[tiers.free]\nidle_timeout = 1\nmax_age = 1\nquotas.tokens = { limit = -5 }\n')
    assert err.value.path == "tiers.free.quotas.tokens.limit"
    with pytest.raises(PolicyError, match="unknown field `rate_limit` - at `tiers.free`"):
        load_policy('version = 1\n[tiers.free]\nidle_timeout = 1\nmax_age = 1\nrate_limit = {}\n')
    with pytest.raises(PolicyError, match="at `tiers.pro.rate_limits.operations.chat.per_minute`"):
        load_policy('version = 1\n[tiers.pro]\nidle_timeout = 1\nmax_age = 1\n'
                    'rate_limits.operations.chat = { per_minute = "many" }\n')


def test_the_packaged_policy_defines_every_dimension_for_every_tier() -> None:
    from actors.policy import default_policy

    policy = default_policy()
    assert set(policy.tiers) == {"free", "basic", "pro", "enterprise"}
    for tier in policy.tiers.values():
        assert set(tier.quotas) == set(QuotaType)
        assert all(tier.rate_limits.default.limit(w) is not None for w in RateLimitType)
        assert tier.concurrency.total >= tier.concurrency.default >= 1
        assert tier.max_sessions_per_user >= 1


def test_tenant_overrides_merge_and_bump_the_policy_version() -> None:
    state = tenant_logic.TenantState(tenant="acme")
    overrides = {"tiers": {"small": {"quotas": {"tokens": {"limit": 5}}}}}
    d = tenant_logic.decide(state, SetTenantPolicy(overrides=overrides), T0, POLICY)
    assert d.rejection is None
    (changed,) = d.events
    state = tenant_logic.evolve(state, changed)
    policy = tenant_logic.effective_policy(state, POLICY)
    assert policy.version == 8
    assert policy.tiers["small"].quotas[QuotaType.TOKENS].limit == 5
    assert policy.tiers["small"].quotas[QuotaType.API_CALLS].limit == 5  # untouched
    assert policy.tiers["big"] == POLICY.tiers["big"]
    bad_overrides = {"tiers": {"big": {"concurrency": {"total": "x"}}}}
    bad = tenant_logic.decide(state, SetTenantPolicy(overrides=bad_overrides), T0, POLICY)
    assert bad.rejection is not None and bad.rejection.fields["field"] == "overrides.tiers.big.concurrency.total"
    versioned = tenant_logic.decide(state, SetTenantPolicy(overrides={"version": 99}), T0, POLICY)
    assert versioned.rejection is not None and versioned.rejection.fields["field"] == "overrides.version"
    assert tenant_logic.decide(state, GetSession(), T0, POLICY).events == ()


def test_user_quota_adjustments_are_tenant_events() -> None:
    state = tenant_logic.TenantState(tenant="acme")
    adjust = AdjustUserQuota(user_id="u1", resource_type=QuotaType.TOKENS, limit=9, until=T0 + 5)
    d = tenant_logic.decide(state, adjust, T0, POLICY)
    state = tenant_logic.evolve(state, d.events[0])
    assert state.user_boosts == {"u1": {"tokens": (9.0, T0 + 5)}}
    reset = AdjustUserQuota(user_id="u1", resource_type=QuotaType.TOKENS, limit=None)
    d = tenant_logic.decide(state, reset, T0, POLICY)
    assert tenant_logic.evolve(state, d.events[0]).user_boosts == {"u1": {}}
    assert math.isfinite(T0)
