"""The NATS command service: actor hosts answer ``<prefix>cmd.<tenant>.<session_id>`` requests.

Hosts subscribe in one queue group, so any number of processes share the load; optimistic
concurrency on the log keeps each session single-writer even when two hosts race. Every reply
is a JSON :class:`~actors.events.CommandReply`; malformed requests get a typed rejection that
names the offending field, never a silent drop.

The principal recorded for a command is the authenticated identity
(:func:`blackbird.commands.identity.identity_of`): a tenant's credentials are confined to their
tenant (and a user-bound credential to its user's sessions), whatever the body claims.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, get_args

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.events import CommandReply, CommandRequest, CreateSession, GetSession, SessionCommand
from actors.validation import MAX_DEPTH, Invalid, invalid_from
from blackbird.commands.dispatch import Dispatcher, rejection_from_error, rejection_from_invalid
from blackbird.commands.identity import authorize_command, authorize_session, identity_of
from blackbird.errors import BlackbirdError, ValidationError
from blackbird.ids import new_id
from blackbird.subjects import Subjects

log = structlog.get_logger("blackbird.service")


class CommandService:
    """Serves session commands from NATS until cancelled."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        dispatcher: Dispatcher,
        queue: str,
        accounts: Mapping[str, str] | None = None,
    ) -> None:
        """``accounts``: operator-mode account public keys -> tenant (see identity_of)."""
        self._accounts = accounts
        self._nc = nc
        self._subjects = subjects
        self._dispatcher = dispatcher
        self._queue = queue
        self._decode = msgspec.json.Decoder(CommandRequest).decode
        self._encode = msgspec.json.Encoder().encode

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for subject in (self._subjects.command_wildcard, self._subjects.query_wildcard):
                await tg.start(serve_requests, self._nc, subject, self._queue, self._handle)
            task_status.started()

    async def _handle(self, msg: Msg) -> None:
        reply = await self._answer(msg)
        try:
            await self._nc.publish(msg.reply, self._encode(reply))
        except Exception as exc:  # the caller may have gone; the command itself is durable
            log.warning("reply_failed", subject=msg.subject, error=str(exc))

    async def _answer(self, msg: Msg) -> CommandReply:
        try:
            tenant, session_id = self._subjects.parse_command(msg.subject)
        except BlackbirdError as exc:
            return CommandReply(rejection=rejection_from_error(exc))
        try:
            request = self._decode(msg.data)
        except msgspec.ValidationError as exc:
            problem = invalid_from(exc, _COMMANDS, "command", "body")
            return CommandReply(rejection=rejection_from_invalid(problem))
        # Malformed JSON, bytes that are not UTF-8 (msgspec raises UnicodeDecodeError) and
        # documents nested past the decoder's recursion limit are all told apart by a scan of
        # the raw body, so the caller hears which field, as a caller of the SDK would.
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            return CommandReply(rejection=rejection_from_invalid(_undecodable(msg.data, exc)))
        try:
            query = msg.subject.startswith(self._subjects.service_prefix + ".")
            if query and not isinstance(request.command, GetSession):
                raise ValidationError(
                    f"command: {msg.subject} answers GetSession only; send {type(request.command).__name__} "
                    f"on {self._subjects.command(tenant, session_id)}",
                    field="command", expected="GetSession", got=type(request.command).__name__,
                )
            identity = identity_of(msg.headers, tenant, request.principal, self._accounts)
            authorize_command(identity, request.command)
        except BlackbirdError as exc:
            log.warning("command_denied", tenant=tenant, session_id=session_id, error=str(exc))
            return CommandReply(rejection=rejection_from_error(exc))
        if identity.user_id is not None and not isinstance(request.command, CreateSession):
            # a user-bound credential reaches its user's sessions only: ask the session first
            owner = await self._dispatcher.dispatch(tenant, session_id, GetSession(), new_id(), identity.principal)
            if owner.session is None:
                return owner
            try:
                authorize_session(identity, owner.session.user_id, type(request.command).__name__)
            except BlackbirdError as exc:
                return CommandReply(rejection=rejection_from_error(exc))
        command_id = request.command_id or new_id()
        return await self._dispatcher.dispatch(
            tenant, session_id, request.command, command_id, identity.principal
        )


async def serve_requests(
    nc: NATS,
    subject: str,
    queue: str,
    handle: Callable[[Msg], Coroutine[Any, Any, None]],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Hand every request on ``subject`` (one of the hosts' queue group ``queue``) to ``handle``, each
    in its own task, until cancelled; ready once subscribed. A message without a reply subject
    is no request: nobody could hear an answer, so it is dropped."""
    sub = await nc.subscribe(subject, queue=queue)
    log.info("service_started", subject=subject, queue=queue)
    task_status.started()
    try:
        async with anyio.create_task_group() as tg:
            async for msg in sub.messages:
                if msg.reply:
                    tg.start_soon(handle, msg)
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()


_COMMANDS: tuple[type[Any], ...] = get_args(SessionCommand)
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},:]', re.DOTALL)
_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_AT_BYTE = re.compile(r"\(byte (\d+)\)")
_NESTING = 2 + MAX_DEPTH  # the request, its command, then a document's own levels


def _bad_text(content: bytes) -> str | None:
    """Why the inside of a JSON string is not valid Unicode text, or None."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return "text that is valid UTF-8"
    pending = -1  # where the escape after a high surrogate must start
    for m in _ESCAPE.finditer(content):
        code = int(m.group(1)[1:], 16) if m.group(1)[:1] == b"u" and len(m.group(1)) == 5 else None
        if pending >= 0 and (m.start() != pending or code is None or not 0xDC00 <= code <= 0xDFFF):
            return "valid Unicode text (no lone surrogates)"
        if code is not None and 0xDC00 <= code <= 0xDFFF and pending < 0:
            return "valid Unicode text (no lone surrogates)"
        pending = m.end() if code is not None and 0xD800 <= code <= 0xDBFF else -1
    return None if pending < 0 else "valid Unicode text (no lone surrogates)"


def _undecodable(raw: bytes, exc: Exception) -> Invalid:
    """Why ``raw`` could not be decoded as a CommandRequest, naming the field of the command
    (as the SDK would) where a scan of its JSON structure finds it: a string that is not valid
    Unicode, nesting deeper than any document may be, or the place the decoder stopped at (a
    ``NaN`` is not JSON)."""
    found = _AT_BYTE.search(str(exc)) if isinstance(exc, msgspec.DecodeError) else None
    offset = int(found.group(1)) if found else getattr(exc, "start", None)
    path: list[str | int] = []  # keys and indexes down to where the scan is
    expecting_key: list[bool] = []
    for m in _JSON_TOKEN.finditer(raw):
        if offset is not None and m.start() >= offset and path:
            return Invalid(_field(path), "valid JSON (NaN and Infinity are not JSON numbers)", str(exc))
        token = m.group()
        if token[:1] == b'"':
            is_key = bool(expecting_key) and expecting_key[-1]
            if is_key:
                path[-1] = token[1:-1].decode("utf-8", "replace")
            why = _bad_text(token[1:-1])
            if why is not None:
                return Invalid(_field(path[:-1] if is_key else path), why)
        elif token in (b"{", b"["):
            if len(path) >= _NESTING:
                return Invalid(_field(path), f"at most {MAX_DEPTH} levels of nesting", "more")
            path.append(0 if token == b"[" else "")
            expecting_key.append(token == b"{")
        elif token in (b"}", b"]"):
            if path:
                path.pop()
                expecting_key.pop()
        elif token == b"," and path:
            if isinstance(path[-1], int):
                path[-1] += 1
            else:
                expecting_key[-1] = True
        elif token == b":" and expecting_key:
            expecting_key[-1] = False
    reason = str(exc) if isinstance(exc, msgspec.DecodeError) else type(exc).__name__
    return Invalid("body", "a JSON CommandRequest (see actors.events)", reason)


def _field(path: list[str | int]) -> str:
    """The field a path into a request names: the command's own field, as the SDK names it."""
    if len(path) >= 2 and path[0] == "command":
        return str(path[1])
    return str(path[0]) if path and path[0] != "" else "body"
