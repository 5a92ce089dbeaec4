"""Multi-user sessions: participants join and leave with a role, and only the owner and
participants may post as an author; observers read only.

The pure rules first (decide and evolve, no I/O), then the SDK, raw NATS, replay after a restart
and the HTTP endpoints, each on a real nats-server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from actors.events import (
    OWNER,
    Applied,
    Commit,
    CreateSession,
    Decision,
    JoinSession,
    LeaveSession,
    MessagePosted,
    ParticipantJoined,
    ParticipantLeft,
    ParticipantRole,
    PostMessage,
    SessionCommand,
    TerminateSession,
)
from actors.policy import default_policy
from actors.session import SessionState, apply_commit, decide, initial_state, role_of
from blackbird import AccessDeniedError, AsyncBlackbird, SessionInactiveError, ValidationError
from blackbird.audit.render import describe
from blackbird.commands.dispatch import error_of_rejection

from .conftest import NatsServer, new_id, serving_http

POLICY = default_policy()
T0 = 1_700_000_000.0
PARTICIPANT, OBSERVER = ParticipantRole.PARTICIPANT, ParticipantRole.OBSERVER


def step(state: SessionState, command: SessionCommand, at: float = T0 + 1) -> tuple[SessionState, Decision]:
    """Decide ``command`` and fold what it caused (as the actor does)."""
    d = decide(state, command, at, POLICY)
    if d.events:
        applied = (Applied(new_id(), "t", d.events),)
        state = apply_commit(state, Commit(at=at, version=state.version + 1, commands=applied))
    return state, d


def owned_by(owner: str = "alice") -> SessionState:
    state, d = step(initial_state("acme", "s1"), CreateSession(user_id=owner, tier="pro"), T0)
    assert d.rejection is None
    return state


def joined(*members: tuple[str, ParticipantRole]) -> SessionState:
    state = owned_by()
    for user_id, role in members:
        state, d = step(state, JoinSession(user_id=user_id, role=role))
        assert d.rejection is None
    return state


# ------------------------------------------------------------------ pure rules


def test_the_owner_is_implicit_from_creation_and_listed_first() -> None:
    state = owned_by()
    assert state.participants == {}
    assert role_of(state, "alice") == OWNER
    assert state.view().participants == {"alice": "owner"}


def test_a_user_joins_as_participant_by_default_and_the_view_lists_them() -> None:
    state, d = step(owned_by(), JoinSession(user_id="bob"))
    assert d.rejection is None and d.events == (ParticipantJoined(at=T0 + 1, user_id="bob", role="participant"),)
    assert state.view().participants == {"alice": "owner", "bob": "participant"}


def test_joining_again_changes_the_role() -> None:
    state = joined(("bob", OBSERVER))
    state, _ = step(state, JoinSession(user_id="bob", role=PARTICIPANT))
    assert role_of(state, "bob") == "participant"
    state, _ = step(state, JoinSession(user_id="bob", role=OBSERVER))
    assert state.participants == {"bob": "observer"}


@pytest.mark.parametrize("command", [JoinSession(user_id="alice", role=OBSERVER), LeaveSession(user_id="alice")])
def test_the_owner_cannot_be_re_roled_or_leave(command: SessionCommand) -> None:
    state, d = step(owned_by(), command)
    assert d.events == ()
    assert d.rejection is not None and d.rejection.code == "validation_error"
    assert d.rejection.fields["field"] == "user_id" and "owns session" in d.rejection.message
    assert role_of(state, "alice") == OWNER


def test_leaving_when_not_a_participant_is_a_typed_refusal() -> None:
    _, d = step(owned_by(), LeaveSession(user_id="mallory"))
    assert d.events == () and d.rejection is not None
    error = error_of_rejection(d.rejection)
    assert isinstance(error, ValidationError) and error.field == "user_id" and error.got == "mallory"


def test_a_participant_who_left_is_a_stranger_again_and_cannot_leave_twice() -> None:
    state, d = step(joined(("bob", PARTICIPANT)), LeaveSession(user_id="bob"))
    assert d.events == (ParticipantLeft(at=T0 + 1, user_id="bob"),)
    assert role_of(state, "bob") is None and state.view().participants == {"alice": "owner"}
    _, again = step(state, LeaveSession(user_id="bob"))
    assert again.rejection is not None and again.rejection.fields["field"] == "user_id"


@pytest.mark.parametrize("author", ["alice", "bob"])
def test_the_owner_and_participants_post_as_authors_and_the_event_records_who(author: str) -> None:
    _, d = step(joined(("bob", PARTICIPANT)), PostMessage(text="hi", author=author))
    assert d.rejection is None
    (posted,) = d.events
    assert isinstance(posted, MessagePosted) and posted.author == author
    assert describe(posted) == f"MessagePosted chat (2 chars) by {author}"


@pytest.mark.parametrize(("author", "why"), [("carol", "observer"), ("mallory", "not a participant")])
def test_observers_and_strangers_cannot_post_as_authors(author: str, why: str) -> None:
    _, d = step(joined(("carol", OBSERVER)), PostMessage(text="hi", author=author))
    assert d.events == ()
    assert d.rejection is not None and d.rejection.code == "access_denied" and why in d.rejection.message
    error = error_of_rejection(d.rejection)
    assert isinstance(error, AccessDeniedError)
    assert (error.principal, error.action, error.tenant) == (author, "post_message", "acme")


def test_a_message_without_author_is_a_services_and_is_not_checked() -> None:
    _, d = step(joined(("carol", OBSERVER)), PostMessage(text="tool output", channel="presence"))
    assert d.rejection is None and d.events[0].author is None  # type: ignore[union-attr]


@pytest.mark.parametrize("command", [JoinSession(user_id="bob"), LeaveSession(user_id="bob")])
def test_joining_or_leaving_a_terminated_session_is_refused_like_any_command(command: SessionCommand) -> None:
    state, _ = step(joined(("bob", PARTICIPANT)), TerminateSession())
    _, d = step(state, command, T0 + 2)
    assert d.events == () and d.rejection is not None and d.rejection.code == "session_inactive"


def test_joining_an_expired_session_records_the_expiry_and_is_refused() -> None:
    state = owned_by()
    later = T0 + POLICY.tiers["pro"].idle_timeout + 1
    _, d = step(state, JoinSession(user_id="bob"), later)
    assert d.rejection is not None and d.rejection.code == "session_inactive"
    assert [type(e).__name__ for e in d.events] == ["SessionExpired"]


def test_the_audit_describes_joins_and_leaves() -> None:
    assert describe(ParticipantJoined(at=T0, user_id="bob", role="observer")) == "ParticipantJoined bob as observer"
    assert describe(ParticipantLeft(at=T0, user_id="bob")) == "ParticipantLeft bob"


USERS = st.sampled_from(["alice", "bob", "carol", "dave"])
COMMANDS = st.one_of(
    st.builds(JoinSession, user_id=USERS, role=st.sampled_from(list(ParticipantRole))),
    st.builds(LeaveSession, user_id=USERS),
    st.builds(PostMessage, text=st.just("x"), author=st.none() | USERS),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(COMMANDS, max_size=25))
def test_any_sequence_keeps_the_roles_a_simple_model_predicts(commands: list[SessionCommand]) -> None:
    """Against a dict model: the owner never changes, joins set a role, leaves remove it, and a
    post with an author is accepted exactly when the model says the author may post."""
    state, model = owned_by(), {"alice": "owner"}
    for i, command in enumerate(commands):
        state, d = step(state, command, T0 + 1 + i)
        if isinstance(command, JoinSession):
            assert (d.rejection is None) == (command.user_id != "alice")
            if command.user_id != "alice":
                model[command.user_id] = command.role.value
        elif isinstance(command, LeaveSession):
            may_leave = command.user_id != "alice" and command.user_id in model
            assert (d.rejection is None) == may_leave
            if may_leave:
                del model[command.user_id]
        elif isinstance(command, PostMessage) and command.author is not None:
            may_post = model.get(command.author) in ("owner", "participant")
            assert (d.rejection is None) == may_post, (command, model)
        assert state.view().participants == model


# ------------------------------------------------------------------ SDK, raw NATS, replay


async def raw(nc: NATS, session_id: str, command: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(f"bbcmd.acme.{session_id}", json.dumps({"command": command}).encode(), timeout=10)
    reply: dict[str, Any] = json.loads(msg.data)
    return reply


@pytest.mark.anyio
async def test_sdk_round_trip_join_post_leave(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("alice", tier="pro")
    assert s.participants == {"alice": "owner"}
    s = await sm.join_session(s.session_id, "bob")
    s = await sm.join_session(s.session_id, "carol", "observer")
    assert s.participants == {"alice": "owner", "bob": "participant", "carol": "observer"}
    assert s.to_dict()["participants"] == s.participants
    posted = await sm.send_message("hello", session_id=s.session_id, author="bob")
    assert posted["sequence"] > 0
    with pytest.raises(AccessDeniedError) as err:
        await sm.send_message("me too", session_id=s.session_id, author="carol")
    assert err.value.principal == "carol" and err.value.tenant == "acme"
    with pytest.raises(AccessDeniedError):
        await sm.send_message("let me in", session_id=s.session_id, author="mallory")
    await sm.send_message('{"online": true}', session_id=s.session_id, channel="presence", author="alice")
    s = await sm.leave_session(s.session_id, "bob")
    assert s.participants == {"alice": "owner", "carol": "observer"}
    with pytest.raises(ValidationError) as bad:
        await sm.leave_session(s.session_id, "bob")
    assert bad.value.field == "user_id"
    with pytest.raises(ValidationError) as owner:
        await sm.leave_session(s.session_id, "alice")
    assert owner.value.field == "user_id"
    await sm.terminate_session(s.session_id)
    with pytest.raises(SessionInactiveError):
        await sm.join_session(s.session_id, "dave")
    text = (await bb.audit.replay(session_id=s.session_id)).render()
    assert "ParticipantJoined carol as observer" in text and "ParticipantLeft bob" in text


@pytest.mark.anyio
async def test_presence_is_a_channel_a_subscriber_can_follow(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("alice", tier="pro")
    await bb.session_manager.send_message("typing", session_id=s.session_id, channel="presence", author="alice")
    async with bb.streams.subscribe(s.session_id, channels=["presence"]) as stream:
        event = await stream.get(timeout=10)
    assert event is not None and (event.channel, event.text) == ("presence", "typing")


@pytest.mark.anyio
async def test_sdk_refuses_bad_arguments_before_sending_naming_the_field(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("alice", tier="pro")
    before = await bb.journal.stream_last_seq()
    cases: list[tuple[Any, str]] = [
        (sm.join_session(s.session_id, "bob", "owner"), "role"),
        (sm.join_session(s.session_id, "bob", "admin"), "role"),
        (sm.join_session(s.session_id, "a.b"), "user_id"),
        (sm.leave_session(s.session_id, "x" * 200), "user_id"),
        (sm.send_message("hi", session_id=s.session_id, author="a b"), "author"),
    ]
    for call, field in cases:
        with pytest.raises(ValidationError) as err:
            await call
        assert err.value.field == field
    assert await bb.journal.stream_last_seq() == before


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("command", "field"),
    [
        ({"type": "JoinSession", "user_id": "bob", "role": "owner"}, "role"),
        ({"type": "JoinSession", "user_id": "bob", "role": 3}, "role"),
        ({"type": "JoinSession", "user_id": "b.ob"}, "user_id"),
        ({"type": "JoinSession", "user_id": "x" * 200}, "user_id"),
        ({"type": "JoinSession"}, "user_id"),
        ({"type": "JoinSession", "user_id": "bob", "admin": True}, "admin"),
        ({"type": "LeaveSession", "user_id": "b ob"}, "user_id"),
        ({"type": "PostMessage", "text": "hi", "author": "a>b"}, "author"),
    ],
)
async def test_raw_nats_commands_with_bad_fields_are_refused_naming_the_field(
    nats_server: NatsServer, nc: NATS, command: dict[str, Any], field: str
) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", serve_commands=True) as host:
        s = await host.session_manager.create_session("alice", tier="pro")
        before = await host.journal.stream_last_seq()
        reply = await raw(nc, s.session_id, command)
        assert reply["rejection"]["code"] == "validation_error"
        assert reply["rejection"]["fields"]["field"] == field, reply["rejection"]
        assert await host.journal.stream_last_seq() == before
        good = await raw(nc, s.session_id, {"type": "JoinSession", "user_id": "bob", "role": "observer"})
        assert good["rejection"] is None and good["session"]["participants"]["bob"] == "observer"


@pytest.mark.anyio
async def test_replay_after_a_restart_gives_the_same_participants(tmp_path: Path) -> None:
    async with AsyncBlackbird(data_dir=tmp_path / "data", snapshot_every=3) as bb:
        sm = bb.session_manager
        s = await sm.create_session("alice", tier="pro")
        for user, role in [("bob", "participant"), ("carol", "observer"), ("dave", "participant")]:
            await sm.join_session(s.session_id, user, role)
        await sm.leave_session(s.session_id, "dave")
        before = (await sm.join_session(s.session_id, "carol", "participant")).participants
    async with AsyncBlackbird(data_dir=tmp_path / "data") as bb:
        after = await bb.session_manager.get_session(s.session_id)
        assert after is not None and after.participants == before
        assert before == {"alice": "owner", "bob": "participant", "carol": "participant"}
        await bb.session_manager.send_message("back", session_id=s.session_id, author="carol")


# ------------------------------------------------------------------ HTTP

TOKEN = "acme-participants-token"


@pytest.mark.anyio
async def test_http_lists_adds_and_removes_participants(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("alice", tier="pro")
    path = f"/v1/sessions/{s.session_id}/participants"
    async with serving_http(bb, {TOKEN: "acme"}) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as http:
        listed = await http.get(path)
        assert listed.status_code == 200
        assert listed.json() == {
            "session_id": s.session_id, "owner": "alice", "participants": [{"user_id": "alice", "role": "owner"}]
        }
        added = await http.post(path, json={"user_id": "bob", "role": "observer"})
        assert added.status_code == 200, added.text
        assert {"user_id": "bob", "role": "observer"} in added.json()["participants"]
        again = await http.post(path, json={"user_id": "bob"})
        assert {"user_id": "bob", "role": "participant"} in again.json()["participants"]
        bad = await http.post(path, json={"user_id": "bob", "role": "owner"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "role"
        bad_id = await http.post(path, json={"user_id": "b.ob"})
        assert bad_id.status_code == 400 and bad_id.json()["error"]["field"] == "user_id"
        owner = await http.delete(f"{path}/alice")
        assert owner.status_code == 400 and owner.json()["error"]["field"] == "user_id"
        removed = await http.delete(f"{path}/bob")
        assert removed.status_code == 200
        assert removed.json()["participants"] == [{"user_id": "alice", "role": "owner"}]
        missing = await http.get(f"/v1/sessions/{new_id()}/participants")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
        unauthorized = await http.get(path, headers={"Authorization": "Bearer not-a-token-of-ours"})
        assert unauthorized.status_code == 401
        schema = (await http.get("/openapi.json")).json()
        assert set(schema["paths"]["/v1/sessions/{session_id}/participants"]) == {"get", "post"}
    assert (await bb.session_manager.get_session(s.session_id)).participants == {"alice": "owner"}  # type: ignore[union-attr]


@dataclass
class StaticKey:
    """An API key as a KeyVerifier reports it (the presented secret is its id here)."""

    key_id: str
    tenant: str
    role: str
    user_id: str | None


class StaticKeys:
    """A fixed table of user keys: a KeyVerifier, so the endpoints' rules for user keys are
    tested without the API-key store."""

    def __init__(self, *user_ids: str) -> None:
        self.keys = {f"bbk_{u}": StaticKey(f"k-{u}", "acme", "user", u) for u in user_ids}

    def verify(self, presented: str) -> StaticKey | None:
        return self.keys.get(presented)


@pytest.mark.anyio
async def test_http_user_keys_the_owner_adds_a_participant_removes_themself_strangers_see_404(
    bb: AsyncBlackbird,
) -> None:
    s = await bb.session_manager.create_session("alice", tier="pro")
    path = f"/v1/sessions/{s.session_id}/participants"
    keys = StaticKeys("alice", "bob", "carol", "mallory")
    async with serving_http(bb, {TOKEN: "acme"}, keys=keys) as url, httpx.AsyncClient(base_url=url) as http:

        def as_(user: str) -> dict[str, str]:
            return {"Authorization": f"Bearer bbk_{user}"}

        assert (await http.get(path, headers=as_("mallory"))).status_code == 404  # not 403: unseen
        assert (await http.post(path, json={"user_id": "mallory"}, headers=as_("mallory"))).status_code == 404
        added = await http.post(path, json={"user_id": "bob"}, headers=as_("alice"))
        assert added.status_code == 200, added.text
        await http.post(path, json={"user_id": "carol", "role": "observer"}, headers=as_("alice"))
        # a participant reads, but may neither add nor promote anyone (themself included)
        assert (await http.get(path, headers=as_("carol"))).status_code == 200
        denied = await http.post(path, json={"user_id": "carol"}, headers=as_("carol"))
        assert denied.status_code == 403 and denied.json()["error"]["principal"] == "key:k-carol"
        assert (await http.post(path, json={"user_id": "mallory"}, headers=as_("bob"))).status_code == 403
        # nobody but the owner (or an admin) removes another; anyone removes themself
        assert (await http.delete(f"{path}/carol", headers=as_("bob"))).status_code == 403
        assert (await http.delete(f"{path}/carol", headers=as_("carol"))).status_code == 200
        assert (await http.delete(f"{path}/bob", headers=as_("alice"))).status_code == 200
        assert (await http.get(path, headers=as_("bob"))).status_code == 404  # left: a stranger again
    after = await bb.session_manager.get_session(s.session_id)
    assert after is not None and after.participants == {"alice": "owner"}
