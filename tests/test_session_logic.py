"""The session aggregate's pure rules: decide() and evolve(), no I/O."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import event as count_case
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import idempotency
from actors.events import (
    Applied,
    ChangeTier,
    Commit,
    CreateSession,
    GetSession,
    SessionCommand,
    SessionExpired,
    SessionStatus,
    SessionTerminated,
    SessionTouched,
    TerminateSession,
    TierChanged,
    TouchSession,
)
from actors.policy import PolicyError, default_policy, load_policy
from actors.session import RECENT_COMMANDS, SessionState, apply_commit, decide, fold, initial_state
from blackbird.types import Session

POLICY = default_policy()
T0 = 1_700_000_000.0


def created(tier: str = "pro", at: float = T0) -> SessionState:
    d = decide(initial_state("acme", "s1"), CreateSession(user_id="u1", tier=tier), at, POLICY)
    return apply_commit(initial_state("acme", "s1"), commit(d.events, "c0", 1, at))


def commit(events: tuple, command_id: str, version: int, at: float = T0) -> Commit:
    return Commit(at=at, version=version, commands=(Applied(command_id, "test", events),))


def test_create_records_the_tier_policy_in_force() -> None:
    d = decide(initial_state("acme", "s1"), CreateSession(user_id="u1", tier="pro"), T0, POLICY)
    assert d.rejection is None
    (event,) = d.events
    pro = POLICY.tiers["pro"]
    assert (event.idle_timeout, event.max_age, event.policy_version) == (
        pro.idle_timeout,
        pro.max_age,
        POLICY.version,
    )


def test_create_twice_is_refused_without_events() -> None:
    d = decide(created(), CreateSession(user_id="u1"), T0 + 1, POLICY)
    assert d.events == () and d.rejection is not None and d.rejection.code == "session_exists"


def test_unknown_tier_is_refused_naming_the_field() -> None:
    d = decide(initial_state("acme", "s1"), CreateSession(user_id="u1", tier="gold"), T0, POLICY)
    assert d.events == ()
    assert d.rejection is not None and d.rejection.fields["field"] == "tier"
    assert "free" in d.rejection.message and "gold" in d.rejection.message


@pytest.mark.parametrize("command", [TouchSession(), TerminateSession(), ChangeTier(tier="pro")])
def test_commands_on_a_missing_session_are_refused(command: SessionCommand) -> None:
    d = decide(initial_state("acme", "nope"), command, T0, POLICY)
    assert d.events == () and d.rejection is not None and d.rejection.code == "session_not_found"


def test_idle_session_expires_on_its_next_command_and_records_why() -> None:
    state = created("free")
    later = T0 + POLICY.tiers["free"].idle_timeout + 1
    d = decide(state, TouchSession(), later, POLICY)
    assert d.events == (SessionExpired(at=later, reason="idle_timeout"),)
    assert d.rejection is not None and d.rejection.code == "session_inactive"
    expired = apply_commit(state, commit(d.events, "c1", 2, later))
    assert expired.status is SessionStatus.EXPIRED
    again = decide(expired, TouchSession(), later + 1, POLICY)
    assert again.events == () and again.rejection is not None and again.rejection.code == "session_inactive"


def test_session_past_its_maximum_age_expires_even_when_busy() -> None:
    state = created("free")
    t = T0
    # keep it busy: touches well inside the idle timeout, until past the maximum age
    step = POLICY.tiers["free"].idle_timeout / 2
    version = 1
    while t - T0 < POLICY.tiers["free"].max_age:
        t += step
        d = decide(state, TouchSession(), t, POLICY)
        if d.rejection:
            break
        version += 1
        state = apply_commit(state, commit(d.events, f"c{version}", version, t))
    assert d.rejection is not None and d.rejection.fields["reason"] == "max_age"


def test_touch_moves_last_activity_only() -> None:
    state = created()
    d = decide(state, TouchSession(operation="chat"), T0 + 5, POLICY)
    after = apply_commit(state, commit(d.events, "c1", 2, T0 + 5))
    assert after.last_activity == T0 + 5 and after.created_at == T0 and after.version == 2


def test_terminated_session_refuses_commands_but_answers_queries() -> None:
    state = created()
    d = decide(state, TerminateSession(), T0 + 1, POLICY)
    assert d.events == (SessionTerminated(at=T0 + 1, reason="terminated"),)
    done = apply_commit(state, commit(d.events, "c1", 2, T0 + 1))
    assert decide(done, GetSession(), T0 + 2, POLICY).rejection is None
    assert decide(done, TouchSession(), T0 + 2, POLICY).rejection.code == "session_inactive"  # type: ignore[union-attr]


def test_tier_change_applies_the_new_limits() -> None:
    d = decide(created("free"), ChangeTier(tier="enterprise"), T0 + 1, POLICY)
    (event,) = d.events
    assert isinstance(event, TierChanged) and event.old_tier == "free"
    assert event.idle_timeout == POLICY.tiers["enterprise"].idle_timeout


def test_commit_remembers_a_bounded_window_of_command_ids() -> None:
    state = created()
    for i in range(RECENT_COMMANDS + 10):
        state = apply_commit(state, commit((SessionTouched(at=T0, operation="x"),), f"id{i}", i + 2))
    assert idempotency.size(state.recent_commands) == RECENT_COMMANDS
    assert idempotency.seen(state.recent_commands, f"id{RECENT_COMMANDS + 9}")
    assert idempotency.seen(state.recent_commands, "id10")  # the oldest one still remembered
    assert not idempotency.seen(state.recent_commands, "id9")  # pushed out
    assert not idempotency.seen(state.recent_commands, "never-sent")


# Eviction starts past RECENT_COMMANDS ids: half the examples send up to three windows' worth.
@settings(max_examples=100, deadline=None)
@given(
    prefix=st.text(max_size=8),
    count=st.one_of(st.integers(1, RECENT_COMMANDS), st.integers(RECENT_COMMANDS + 1, 3 * RECENT_COMMANDS)),
    batch=st.integers(1, 40),
)
def test_the_window_remembers_exactly_the_newest_ids(prefix: str, count: int, batch: int) -> None:
    ids = [f"{prefix}{i}" for i in range(count)]
    window = b""
    for i in range(0, len(ids), batch):  # in batches, as commits carry them
        window = idempotency.remember(window, ids[i : i + batch])
    kept = ids[-RECENT_COMMANDS:]
    count_case("ids pushed out of the window" if len(ids) > RECENT_COMMANDS else "nothing pushed out")
    assert idempotency.size(window) == len(kept)
    assert all(idempotency.seen(window, c) for c in kept)
    assert not any(idempotency.seen(window, c) for c in ids[: -len(kept)])


def test_session_reports_inactive_once_idle_past_its_timeout() -> None:
    import time

    now = time.time()
    fresh = Session("s", "u", "t", "free", SessionStatus.ACTIVE, {}, now, now, 60.0, 3600.0)
    stale = msgspec.structs.replace(fresh, last_activity=now - 61)
    old = msgspec.structs.replace(fresh, created_at=now - 3601)
    assert fresh.is_active and not stale.is_active and not old.is_active
    assert stale.to_dict()["status"] == "expired"
    assert str(SessionStatus.ACTIVE) == "active" and SessionStatus.ACTIVE == "active"


def test_policy_errors_name_the_field() -> None:
    with pytest.raises(PolicyError, match=r"idle_timeout"):
        load_policy(b'version = 1\n[tiers.free]\nidle_timeout = "soon"\nmax_age = 10\n')
    with pytest.raises(PolicyError, match=r"colour"):
        load_policy(b'version = 1\n[tiers.free]\nidle_timeout = 1\nmax_age = 10\ncolour = 1\n')


# ---------------------------------------------------------------- properties

commands = st.one_of(
    st.builds(CreateSession, user_id=st.sampled_from(["u1", "u2"]), tier=st.sampled_from(["free", "pro", "gold"])),
    st.builds(TouchSession, operation=st.sampled_from(["chat", "tool"])),
    st.builds(ChangeTier, tier=st.sampled_from(["free", "basic", "enterprise", "nope"])),
    st.builds(TerminateSession),
    st.just(GetSession()),
)
steps = st.lists(st.tuples(commands, st.floats(min_value=0, max_value=5000)), max_size=40)


def run(script: list[tuple[SessionCommand, float]]) -> tuple[SessionState, list[Commit]]:
    state, log, t = initial_state("acme", "s1"), [], T0
    for i, (cmd, dt) in enumerate(script):
        t += dt
        d = decide(state, cmd, t, POLICY)
        if d.events:
            c = commit(d.events, f"c{i}", state.version + 1, t)
            log.append(c)
            state = apply_commit(state, c)
    return state, log


@given(steps)
@settings(max_examples=200, deadline=None)
def test_folding_the_log_reproduces_the_live_state(script: list) -> None:
    live, log = run(script)
    assert fold(initial_state("acme", "s1"), log) == live
    assert fold(initial_state("acme", "s1"), log) == fold(initial_state("acme", "s1"), log)


def cut_within(length: int) -> st.SearchStrategy[int]:
    """Where to snapshot a log of ``length`` commits: anywhere, ends included, but mostly strictly
    inside (a cut drawn without regard to the length mostly lands past the end: empty tails)."""
    anywhere = st.integers(0, length)
    return st.integers(1, length - 1) | anywhere if length >= 2 else anywhere

@given(steps, st.data())
@settings(max_examples=200, deadline=None)
def test_snapshot_plus_tail_equals_full_replay(script: list, data: st.DataObject) -> None:
    live, log = run([(CreateSession(user_id="u1", tier="pro"), 0.0), *script])  # a log to cut into
    cut = data.draw(cut_within(len(log)), label="cut")
    count_case("cut inside the log" if 0 < cut < len(log) else "cut at an end (empty head or tail)")
    snap = fold(initial_state("acme", "s1"), log[:cut])
    # a snapshot survives an encode/decode round trip (that is how it is stored)
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(snap), type=SessionState)
    assert fold(snap, log[cut:]) == live


@given(steps)
@settings(max_examples=200, deadline=None)
def test_commits_survive_the_wire_format(script: list) -> None:
    _, log = run(script)
    for c in log:
        assert msgspec.json.decode(msgspec.json.encode(c), type=Commit) == c


@given(steps)
@settings(max_examples=100, deadline=None)
def test_a_refusal_never_changes_state_except_recording_expiry(script: list) -> None:
    state, t = initial_state("acme", "s1"), T0
    for cmd, dt in script:
        t += dt
        d = decide(state, cmd, t, POLICY)
        if d.rejection is not None:
            assert all(isinstance(e, SessionExpired) for e in d.events)
        if d.events:
            state = apply_commit(state, commit(d.events, "x", state.version + 1, t))


def test_activity_events_are_exactly_those_that_move_last_activity() -> None:
    """The read models rely on ACTIVITY_EVENTS; evolve() is the truth it must match."""
    from actors.events import (
        AcquireSlot,
        Admit,
        AssignAgent,
        CheckRate,
        PostMessage,
        QuotaAdjusted,
        TrackUsage,
    )
    from actors.policy import QuotaType
    from actors.session import ACTIVITY_EVENTS, evolve

    state = created("pro")
    later = T0 + 5
    commands = [
        TouchSession(), ChangeTier(tier="enterprise"), PostMessage(text="hi"),
        TrackUsage(operation="x", resource_type=QuotaType.TOKENS, amount=1),
        CheckRate(operation="x"), AcquireSlot(operation="x"),
        Admit(operation="y", costs={QuotaType.TOKENS: 1.0}, reserve=True, slot=False, rate=False),
        AssignAgent(agent_id="planner"), TerminateSession(),
    ]
    seen = set()
    for command in commands:
        for event in decide(state, command, later, POLICY).events:
            seen.add(type(event))
            moved = evolve(state, event).last_activity != state.last_activity
            assert moved == isinstance(event, ACTIVITY_EVENTS), type(event).__name__
    assert seen >= set(ACTIVITY_EVENTS)
    adjusted = QuotaAdjusted(at=later, resource_type="tokens", limit=1, until=None, policy_version=1)
    assert not isinstance(adjusted, ACTIVITY_EVENTS)
