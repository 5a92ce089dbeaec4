"""The participant endpoints of the HTTP API (join, leave, list a session's participants).

Who may do what, beyond the endpoint's roles:

* reading the list: whoever may read the session (an admin or service key of its tenant, the
  owner's or a participant's user key);
* adding (or re-roling) a participant: an admin or service key, or the owner's user key;
* removing one: an admin or service key, the owner's user key, or the participant's own.

A caller that may not read the session gets 404, exactly as for a session that does not exist.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from actors.events import ParticipantRole
from actors.validation import MAX_ID_LENGTH, TOKEN_PATTERN
from blackbird.errors import AccessDeniedError, SessionNotFoundError
from blackbird.http.auth import Caller
from blackbird.http.routes import Call, Endpoint, HttpContext
from blackbird.types import Session

UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=TOKEN_PATTERN)]


class JoinBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who joins and with which role (joining again changes the role)."""

    user_id: UserId
    role: ParticipantRole = ParticipantRole.PARTICIPANT


class Participant(msgspec.Struct, frozen=True):
    user_id: str
    role: str  # "owner", "participant" or "observer"


class Participants(msgspec.Struct, frozen=True):
    """A session's participants, the owner first."""

    session_id: str
    owner: str
    participants: list[Participant]


def participants_of(session: Session) -> Participants:
    """The wire form of ``session``'s participants (the owner first, then by user id)."""
    others = sorted((u, r) for u, r in session.participants.items() if u != session.user_id)
    return Participants(
        session_id=session.session_id,
        owner=session.user_id,
        participants=[Participant(session.user_id, "owner"), *(Participant(u, r) for u, r in others)],
    )


def _is_tenant_wide(caller: Caller) -> bool:
    return caller.role in ("admin", "service")


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """The endpoints of this module, served with ``ctx``."""
    bb = ctx.bb

    async def readable(call: Call) -> Session:
        """The session of the path if the caller may read it; else SessionNotFoundError (404)."""
        session_id = call.path["session_id"]
        caller = call.caller
        session: Session | None = await bb.session_manager.get_session(session_id, tenant=caller.tenant)
        if session is None or not caller.may_read(session.user_id, session.participants, session_id):
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
        return session

    def deny(caller: Caller, action: str, why: str) -> AccessDeniedError:
        return AccessDeniedError(
            f"{action}: {why}", principal=caller.principal, action=action, tenant=caller.tenant
        )

    async def list_participants(call: Call) -> Participants:
        return participants_of(await readable(call))

    async def add_participant(call: Call) -> Participants:
        session = await readable(call)
        caller, body = call.caller, call.body
        if not _is_tenant_wide(caller) and caller.user_id != session.user_id:
            raise deny(caller, "add a participant", "only the session's owner, an admin or a service key may")
        joined = await bb.session_manager.join_session(
            session.session_id, body.user_id, body.role, tenant=caller.tenant
        )
        return participants_of(joined)

    async def remove_participant(call: Call) -> Participants:
        session = await readable(call)
        caller, user_id = call.caller, call.path["user_id"]
        if not _is_tenant_wide(caller) and caller.user_id not in (session.user_id, user_id):
            raise deny(
                caller, "remove a participant",
                "only the session's owner, the participant themself, an admin or a service key may",
            )
        left = await bb.session_manager.leave_session(session.session_id, user_id, tenant=caller.tenant)
        return participants_of(left)

    path = "/v1/sessions/{session_id}/participants"
    return [
        Endpoint(
            "GET", path, list_participants, "list a session's participants and their roles",
            response=Participants, tag="participants",
        ),
        Endpoint(
            "POST", path, add_participant, "add a participant to a session, or change their role",
            body=JoinBody, response=Participants, tag="participants",
        ),
        Endpoint(
            "DELETE", path + "/{user_id}", remove_participant, "remove a participant from a session",
            response=Participants, tag="participants",
        ),
    ]
