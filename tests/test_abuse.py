"""Abuse and anomaly detection (projections.abuse): a pure fold over hand-built commits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from actors.events import (
    AlertRaised,
    Applied,
    Commit,
    CreateSession,
    QuotaDenied,
    RaiseAlert,
    RateDenied,
    SessionCreated,
    SessionTerminated,
    SlotDenied,
    UsageTracked,
)
from actors.policy import default_policy
from actors.session import decide as decide_session
from actors.session import initial_state as session_initial_state
from actors.user import UserState
from actors.user import decide as decide_user
from projections.abuse import (
    DENIAL_BURST,
    SESSION_BURST,
    USAGE_SPIKE,
    AbuseConfig,
    AbuseState,
    Alert,
    observe,
)

POLICY = default_policy()
T0 = 1_700_000_040.0  # a multiple of 60: bucket edges fall on whole minutes
DEFAULT = AbuseConfig()

Stream = list[tuple[str, Commit]]


def commit(*events: object, at: float) -> Commit:
    return Commit(at=at, version=1, commands=(Applied("c", "test", tuple(events)),))  # type: ignore[arg-type]


def create(session_id: str, user_id: str, at: float, tenant: str = "acme") -> tuple[str, Commit]:
    """A SessionCreated as the session aggregate decides it (pro tier)."""
    decision = decide_session(
        session_initial_state(tenant, session_id),
        CreateSession(user_id=user_id, tier="pro"),
        at,
        POLICY,
    )
    assert decision.rejection is None
    return f"bb.{tenant}.session.{session_id}", commit(*decision.events, at=at)


def used(
    session_id: str, amount: float, at: float, tenant: str = "acme", resource: str = "tokens"
) -> tuple[str, Commit]:
    event = UsageTracked(
        at=at,
        operation="chat",
        resource_type=resource,
        amount=amount,
        metadata={},
        window_start=at - at % 86400,
        policy_version=1,
    )
    return f"bb.{tenant}.session.{session_id}", commit(event, at=at)


def denied(
    session_id: str, at: float, tenant: str = "acme", kind: type = RateDenied
) -> tuple[str, Commit]:
    if kind is RateDenied:
        event: object = RateDenied(
            at=at,
            operation="chat",
            limit_type="per_minute",
            limit=300,
            retry_after=1.0,
            policy_version=1,
        )
    elif kind is QuotaDenied:
        event = QuotaDenied(
            at=at,
            operation="chat",
            resource_type="tokens",
            amount=10.0,
            used=1e6,
            limit=1e6,
            resets_at=at + 3600,
            policy_version=1,
        )
    else:
        event = SlotDenied(
            at=at, operation="chat", scope="total", active=10, limit=10, policy_version=1
        )
    return f"bb.{tenant}.session.{session_id}", commit(event, at=at)


def steady(
    session_id: str,
    rate: float,
    start: float,
    seconds: float,
    step: float = 1.0,
    tenant: str = "acme",
) -> Iterator[tuple[str, Commit]]:
    """``rate`` units per second, one commit every ``step`` seconds from ``start``."""
    for i in range(int(seconds / step)):
        yield used(session_id, rate * step, start + i * step, tenant)


def run(
    stream: Iterable[tuple[str, Commit]],
    config: AbuseConfig = DEFAULT,
    state: AbuseState | None = None,
    first_seq: int = 1,
) -> tuple[AbuseState, list[Alert]]:
    state = AbuseState() if state is None else state
    alerts: list[Alert] = []
    for seq, (subject, c) in enumerate(stream, start=first_seq):
        alerts.extend(observe(state, config, seq, subject, c))
    return state, alerts


def of_kind(alerts: list[Alert], kind: str) -> list[Alert]:
    return [a for a in alerts if a.kind == kind]


# --------------------------------------------------------------------------- usage spikes


def spike_stream() -> Stream:
    """10 tokens/s for 10 minutes, 1000 tokens/s for one minute, then 10 tokens/s again."""
    return [
        create("s1", "u1", T0),
        *steady("s1", 10, T0, 600),
        *steady("s1", 1000, T0 + 600, 60),
        *steady("s1", 10, T0 + 660, 300),
    ]


def test_a_hundredfold_bucket_raises_one_usage_spike_for_the_session() -> None:
    stream = spike_stream()
    _, alerts = run(stream)
    assert len(alerts) == 1  # the user-level spike is the same spike: not raised twice
    (alert,) = alerts
    assert (alert.tenant, alert.user_id, alert.session_id, alert.kind) == (
        "acme",
        "u1",
        "s1",
        USAGE_SPIKE,
    )
    assert alert.threshold == pytest.approx(5 * 10)  # spike_factor x the 10/s baseline
    assert alert.threshold < alert.value <= 1000
    subject, tripping = stream[alert.trigger_seq - 1]
    assert subject == "bb.acme.session.s1"
    assert T0 + 600 <= tripping.at < T0 + 660 and tripping.events[0].amount == 1000  # type: ignore[union-attr]
    assert alert.at == tripping.at
    assert "tokens" in alert.detail and "s1" in alert.detail


def test_an_alert_becomes_the_user_actors_alert_raised_event() -> None:
    (alert,) = run(spike_stream())[1]
    assert alert.command() == RaiseAlert(
        kind=USAGE_SPIKE,
        session_id="s1",
        detail=alert.detail,
        value=alert.value,
        threshold=alert.threshold,
        trigger_seq=alert.trigger_seq,
    )
    assert alert.command_id == f"alert:usage_spike:{alert.trigger_seq}:s1"
    decision = decide_user(
        UserState(tenant="acme", user_id="u1"), alert.command(), alert.at, POLICY
    )
    (raised,) = decision.events
    assert isinstance(raised, AlertRaised)
    assert (raised.user_id, raised.session_id, raised.trigger_seq) == (
        "u1",
        "s1",
        alert.trigger_seq,
    )


def test_spread_over_many_sessions_raises_a_user_level_spike() -> None:
    # No single session has a baseline (each is new), but the user's total jumps 20x.
    stream: Stream = [create("s0", "u1", T0), *steady("s0", 10, T0, 600, step=5)]
    for i in range(1, 21):
        stream.append(create(f"s{i}", "u1", T0 + 600 + i))
    for k in range(12):
        at = T0 + 630 + k * 2.5
        stream.extend(used(f"s{i}", 250.0, at) for i in range(1, 21))
    _, alerts = run(stream, AbuseConfig(session_burst=100))
    assert [(a.kind, a.user_id, a.session_id) for a in alerts] == [(USAGE_SPIKE, "u1", None)]
    assert alerts[0].threshold == pytest.approx(50)


def test_steady_use_is_silent() -> None:
    stream = [create("s1", "u1", T0), *steady("s1", 10, T0, 3600, step=2)]
    assert run(stream)[1] == []


@settings(max_examples=40, deadline=None)
@given(
    base=st.floats(0.5, 1e4),
    buckets=st.lists(st.tuples(st.floats(-0.5, 0.5), st.booleans()), min_size=5, max_size=40),
)
def test_steady_use_with_jitter_and_pauses_is_silent(
    base: float, buckets: list[tuple[float, bool]]
) -> None:
    """Each minute's rate is within ±50% of ``base``, and some minutes are idle."""
    stream: Stream = [create("s1", "u1", T0)]
    for i, (jitter, idle) in enumerate(buckets):
        if not idle:
            stream.extend(steady("s1", base * (1 + jitter), T0 + 60 * i, 60, step=10))
    assert run(stream)[1] == []


def test_a_slow_ramp_is_silent() -> None:
    stream: Stream = [create("s1", "u1", T0)]
    for i in range(90):  # +5% a minute: 10/s to ~800/s in an hour and a half
        stream.extend(steady("s1", 10 * 1.05**i, T0 + 60 * i, 60, step=5))
    assert run(stream)[1] == []


def test_light_use_of_an_idle_meter_is_under_the_min_rate_floor() -> None:
    # 0.01 tokens/s, then 4 tokens/s: 400x the baseline but under spike_factor x min_rate.
    stream = [
        create("s1", "u1", T0),
        *steady("s1", 0.01, T0, 600, step=10),
        *steady("s1", 4, T0 + 600, 60),
    ]
    assert run(stream)[1] == []
    assert len(run(stream, AbuseConfig(min_rate=0.1))[1]) == 1


def test_usage_of_nothing_is_not_a_bucket_of_usage() -> None:
    # 10/s in even minutes, zero-amount usage in odd ones; then 40/s: under 5x the 10/s
    # baseline, but over 5x a baseline diluted by the empty minutes.
    stream: Stream = [create("s1", "u1", T0)]
    for minute in range(20):
        rate = 10 if minute % 2 == 0 else 0
        stream.extend(steady("s1", rate, T0 + 60 * minute, 60, step=5))
    stream.extend(steady("s1", 40, T0 + 1200, 60, step=5))
    assert run(stream)[1] == []
    assert len(run(stream, AbuseConfig(spike_factor=3.5))[1]) == 1


def test_a_long_lived_active_session_is_still_watched() -> None:
    # Active for 6 hours, past its first deadline (pro idle timeout 4 h + retain_seconds).
    stream = [create("s1", "u1", T0), *steady("s1", 10, T0, 6 * 3600, step=60)]
    stream.extend(steady("s1", 1000, T0 + 6 * 3600, 60, step=5))
    assert [(a.kind, a.session_id) for a in run(stream)[1]] == [(USAGE_SPIKE, "s1")]


def test_no_spike_before_min_buckets_of_history() -> None:
    stream = [create("s1", "u1", T0), *steady("s1", 10, T0, 120), *steady("s1", 1000, T0 + 120, 60)]
    assert run(stream)[1] == []  # two buckets of history, three needed
    assert len(run(stream, AbuseConfig(min_buckets=2))[1]) == 1


# --------------------------------------------------------------------------- denials


def test_twenty_five_denials_in_a_minute_raise_one_denial_burst() -> None:
    stream = [create("s1", "u1", T0), *(denied("s1", T0 + 2 * i) for i in range(25))]
    _, alerts = run(stream)
    assert len(alerts) == 1
    (alert,) = alerts
    assert (alert.kind, alert.tenant, alert.user_id, alert.session_id) == (
        DENIAL_BURST,
        "acme",
        "u1",
        "s1",
    )
    assert (alert.value, alert.threshold) == (20, 20)
    assert alert.trigger_seq == 1 + 20  # the 20th denial (the creation is seq 1)
    assert alert.command_id == f"alert:denial_burst:{alert.trigger_seq}:s1"


def test_fifteen_denials_over_an_hour_are_silent() -> None:
    stream = [create("s1", "u1", T0), *(denied("s1", T0 + 240 * i) for i in range(15))]
    assert run(stream)[1] == []


def test_every_kind_of_denial_counts_towards_a_burst() -> None:
    kinds = [RateDenied] * 10 + [QuotaDenied] * 5 + [SlotDenied] * 5
    stream = [create("s1", "u1", T0), *(denied("s1", T0 + i, kind=k) for i, k in enumerate(kinds))]
    assert [a.kind for a in run(stream)[1]] == [DENIAL_BURST]
    assert run(stream[:-1])[1] == []


def test_denials_just_outside_the_window_do_not_add_up() -> None:
    # 19 denials, then one more exactly a window after the first: never 20 within 60 s.
    stream = [
        create("s1", "u1", T0),
        *(denied("s1", T0 + i) for i in range(19)),
        denied("s1", T0 + 60),
    ]
    assert run(stream)[1] == []


# --------------------------------------------------------------------------- sessions


def test_twelve_sessions_in_two_minutes_raise_one_session_burst() -> None:
    stream: Stream = []
    for i in range(12):
        stream.append(create(f"a{i}", "u1", T0 + 10 * i))
        if i < 3:
            stream.append(create(f"b{i}", "u2", T0 + 10 * i + 5))
    _, alerts = run(stream)
    assert len(alerts) == 1
    (alert,) = alerts
    assert (alert.kind, alert.tenant, alert.user_id, alert.session_id) == (
        SESSION_BURST,
        "acme",
        "u1",
        None,
    )
    assert (alert.value, alert.threshold) == (10, 10)
    subject, tenth = stream[alert.trigger_seq - 1]
    assert subject == "bb.acme.session.a9" and tenth.at == T0 + 90
    assert alert.command_id == f"alert:session_burst:{alert.trigger_seq}:-"


def test_sessions_spread_over_more_than_the_window_are_silent() -> None:
    stream = [create(f"a{i}", "u1", T0 + 40 * i) for i in range(12)]  # 10 take 360 s > 300 s
    assert run(stream)[1] == []


# --------------------------------------------------------------------------- cooldown


def test_a_sustained_spike_alerts_once_per_cooldown_not_every_bucket() -> None:
    # A baseline that barely adapts, so every spiking minute is over the threshold on its own.
    stream = [
        create("s1", "u1", T0),
        *steady("s1", 10, T0, 600),
        *steady("s1", 1000, T0 + 600, 900),
    ]
    slow = AbuseConfig(ewma_alpha=0.01)
    _, alerts = run(stream, slow)
    assert len(alerts) == 2
    assert all(a.session_id == "s1" for a in alerts)
    assert alerts[1].at - alerts[0].at >= slow.cooldown_seconds
    _, without_cooldown = run(stream, AbuseConfig(ewma_alpha=0.01, cooldown_seconds=0))
    assert len(of_kind(without_cooldown, USAGE_SPIKE)) == 15  # once in each of the 15 minutes


def test_a_denial_storm_alerts_once_per_cooldown() -> None:
    stream = [create("s1", "u1", T0), *(denied("s1", T0 + 0.5 * i) for i in range(2500))]  # ~21 min
    _, alerts = run(stream)
    assert [a.at - T0 for a in alerts] == [9.5, 609.5, 1209.5]


# --------------------------------------------------------------------------- determinism


def mixed_stream() -> Stream:
    """Two tenants; spikes, denials, a session burst, terminations and unrelated subjects."""
    stream: Stream = [create("s1", "u1", T0), create("s1", "u1", T0, tenant="globex")]
    for i in range(600):
        at = T0 + i
        stream.append(used("s1", 10, at))
        stream.append(used("s1", 40, at, tenant="globex"))
        if i % 7 == 0:
            stream.append(("bb.acme.tenant", commit(at=at)))
    stream.extend(steady("s1", 1000, T0 + 600, 60))
    stream.extend(denied("s1", T0 + 660 + i) for i in range(30))
    stream.extend(create(f"x{i}", "u2", T0 + 700 + i, tenant="globex") for i in range(11))
    stream.append(
        ("bb.globex.session.x0", commit(SessionTerminated(at=T0 + 720, reason="done"), at=T0 + 720))
    )
    stream.extend(steady("s1", 40, T0 + 720, 3600, step=30, tenant="globex"))
    return stream


def test_the_same_commits_give_the_same_alerts_and_state() -> None:
    stream = mixed_stream()
    state_a, alerts_a = run(stream)
    state_b, alerts_b = run(stream)
    assert {a.kind for a in alerts_a} == {USAGE_SPIKE, DENIAL_BURST, SESSION_BURST}
    assert alerts_a == alerts_b and state_a == state_b
    assert msgspec.msgpack.encode(state_a) == msgspec.msgpack.encode(state_b)


def test_a_snapshot_taken_anywhere_continues_to_the_same_alerts_and_state() -> None:
    stream = mixed_stream()
    state_whole, alerts_whole = run(stream)
    for split in [0, 1, 2, 300, 1300, 1330, 1390, 1400, 1425, 1450, len(stream) - 1, len(stream)]:
        state, alerts = run(stream[:split])
        restored = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=AbuseState)
        assert restored == state
        restored, more = run(stream[split:], state=restored, first_seq=split + 1)
        assert alerts + more == alerts_whole, split
        assert restored == state_whole, split


EVENT = st.tuples(
    st.floats(0, 5),  # seconds since the previous commit
    st.sampled_from(["acme", "globex"]),
    st.integers(0, 3),  # session s<n> of user u<n % 2>
    st.sampled_from(["use", "use", "spike", "deny", "deny", "create", "end"]),
)


@settings(max_examples=30, deadline=None)
@given(events=st.lists(EVENT, min_size=20, max_size=200), data=st.data())
def test_snapshots_never_change_the_outcome(
    events: list[tuple[float, str, int, str]], data: st.DataObject
) -> None:
    """Random streams with every detector and forgetting at work, snapshotted anywhere."""
    config = AbuseConfig(
        bucket_seconds=10,
        min_buckets=1,
        denial_burst=3,
        denial_window=30,
        session_burst=2,
        session_window=60,
        cooldown_seconds=25,
        retain_seconds=40,
    )
    stream: Stream = []
    at = T0
    for dt, tenant, n, what in events:
        at += dt
        sid, subject = f"s{n}", f"bb.{tenant}.session.s{n}"
        if what == "use" or what == "spike":
            stream.append(used(sid, 5.0 if what == "use" else 500.0, at, tenant))
        elif what == "deny":
            stream.append(denied(sid, at, tenant))
        elif what == "end":
            stream.append((subject, commit(SessionTerminated(at=at, reason="done"), at=at)))
        else:  # short-lived sessions, so that some are forgotten and created again
            created = SessionCreated(
                at=at,
                session_id=sid,
                user_id=f"u{n % 2}",
                tier="free",
                metadata={},
                idle_timeout=30.0,
                max_age=120.0,
                policy_version=1,
            )
            stream.append((subject, commit(created, at=at)))
    state_whole, alerts_whole = run(stream, config)
    # drawn within the stream (a split drawn from 0..200 mostly lands past its end: an empty tail)
    split = data.draw(st.integers(1, len(stream) - 1) | st.integers(0, len(stream)), label="split")
    event("split inside the stream" if 0 < split < len(stream) else "split at an end (empty head or tail)")
    state, alerts = run(stream[:split], config)
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=AbuseState)
    state, more = run(stream[split:], config, state, first_seq=split + 1)
    assert alerts + more == alerts_whole
    assert state == state_whole


# --------------------------------------------------------------------------- tenants


def test_tenants_keep_separate_baselines_and_windows() -> None:
    # Same user and session ids in both tenants: acme at 10/s, globex at 300/s; then acme
    # jumps to 300/s (a spike for acme only, none if the two were one baseline).
    stream: Stream = [create("s1", "u1", T0), create("s1", "u1", T0, tenant="globex")]
    for i in range(600):
        stream.append(used("s1", 10, T0 + i))
        stream.append(used("s1", 300, T0 + i, tenant="globex"))
    for i in range(600, 660):
        stream.append(used("s1", 300, T0 + i))
        stream.append(used("s1", 300, T0 + i, tenant="globex"))
    for i in range(12):  # 24 denials of "s1" in a minute, 12 in each tenant
        stream.append(denied("s1", T0 + 700 + i))
        stream.append(denied("s1", T0 + 700 + i, tenant="globex"))
    _, alerts = run(stream)
    assert [(a.tenant, a.kind, a.user_id, a.session_id) for a in alerts] == [
        ("acme", USAGE_SPIKE, "u1", "s1")
    ]
    assert alerts[0].threshold == pytest.approx(50)


# --------------------------------------------------------------------------- configuration


def test_a_lower_spike_factor_fires_where_the_default_does_not() -> None:
    stream = [create("s1", "u1", T0), *steady("s1", 10, T0, 600), *steady("s1", 30, T0 + 600, 60)]
    assert run(stream)[1] == []  # 3x is no spike at 5x
    _, alerts = run(stream, AbuseConfig(spike_factor=2.0))
    assert [a.kind for a in alerts] == [USAGE_SPIKE]
    assert alerts[0].threshold == pytest.approx(20)


def test_burst_thresholds_are_configurable() -> None:
    denials = [create("s1", "u1", T0), *(denied("s1", T0 + i) for i in range(12))]
    sessions = [create(f"a{i}", "u2", T0 + i) for i in range(5)]
    assert run(denials + sessions)[1] == []
    config = AbuseConfig(denial_burst=10, session_burst=5)
    assert [a.kind for a in run(denials + sessions, config)[1]] == [DENIAL_BURST, SESSION_BURST]


def test_out_of_range_config_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="bucket_seconds"):
        AbuseConfig(bucket_seconds=0)
    with pytest.raises(ValueError, match="ewma_alpha"):
        AbuseConfig(ewma_alpha=1.5)
    with pytest.raises(msgspec.ValidationError, match="denial_burst"):
        msgspec.convert({"denial_burst": 0}, AbuseConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"spike_factr": 2}, AbuseConfig)


# --------------------------------------------------------------------------- input and memory


def test_only_session_subjects_count_and_the_prefix_is_free() -> None:
    stream = [
        ("custom.acme.session.s1", create("s1", "u1", T0)[1]),
        *(("custom.acme.session.s1", c) for _, c in (denied("s1", T0 + i) for i in range(20))),
    ]
    assert [(a.tenant, a.session_id) for a in run(stream)[1]] == [("acme", "s1")]
    # the same denials on a user subject, or of a session never created, are not counted
    elsewhere = [("bb.acme.user.u1", c) for _, c in stream] + [
        denied("zz", T0 + i) for i in range(20)
    ]
    assert run(elsewhere)[1] == []


def test_a_lagging_hosts_commits_count_at_the_logs_clock() -> None:
    # Every other commit of the spiking minute is stamped 90 s early by a host whose clock lags.
    spike = [used("s1", 1000, T0 + 600 + i - (90 if i % 2 else 0)) for i in range(60)]
    stream = [create("s1", "u1", T0), *steady("s1", 10, T0, 600), *spike]
    (alert,) = run(stream)[1]
    assert alert.kind == USAGE_SPIKE and alert.at >= T0 + 600
    assert alert.threshold == pytest.approx(50)
    late = [create("s1", "u1", T0), *(denied("s1", T0 + 100 + i) for i in range(19))]
    late.append(denied("s1", T0 + 90))
    (alert,) = run(late)[1]
    assert (alert.kind, alert.at) == (DENIAL_BURST, T0 + 118)


def test_memory_is_bounded_by_the_windows_and_live_sessions() -> None:
    state = AbuseState()
    config = DEFAULT
    seq = 0
    for i in range(200):  # 200 short sessions of 20 users, each used, denied and terminated
        at = T0 + 30 * i
        for subject, c in [
            create(f"s{i}", f"u{i % 20}", at),
            used(f"s{i}", 10, at + 1),
            *(denied(f"s{i}", at + 2) for _ in range(50)),
            (
                f"bb.acme.session.s{i}",
                commit(SessionTerminated(at=at + 3, reason="done"), at=at + 3),
            ),
        ]:
            seq += 1
            observe(state, config, seq, subject, c)
    tenant = state.tenants["acme"]
    assert tenant.sessions == {}
    assert all(len(user.created) <= config.session_burst for user in tenant.users.values())
    # a session left open is forgotten after its idle timeout (pro: 4 h) plus retain_seconds
    last = T0 + 30 * 200
    for subject, c in [create("open", "u1", last), used("open", 10, last + 1)]:
        seq += 1
        observe(state, config, seq, subject, c)
    assert set(state.tenants["acme"].sessions) == {"open"}
    seq += 1
    observe(
        state, config, seq, "bb.acme.tenant", commit(at=last + 4 * 3600 + config.retain_seconds + 2)
    )
    assert state.tenants == {} and state.timers == []


def test_denial_window_keeps_only_what_the_threshold_needs() -> None:
    state, _ = run([create("s1", "u1", T0), *(denied("s1", T0 + 0.01 * i) for i in range(1000))])
    assert len(state.tenants["acme"].sessions["s1"].denials) == DEFAULT.denial_burst
