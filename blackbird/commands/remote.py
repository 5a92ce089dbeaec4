"""Sending session commands to whichever actor host serves them, over NATS request/reply."""

from __future__ import annotations

import time

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from actors.events import CommandReply, CommandRequest, GetSession, SessionCommand
from blackbird._retry import backoff, describe, transient, typed
from blackbird.errors import CommandTimeoutError, LogError
from blackbird.subjects import Subjects

_FIRST_TRY = 1.0  # seconds the first try waits for a host's answer; each next try twice as long


class RemoteDispatcher:
    """Sends commands to whichever actor host serves ``<prefix>cmd.<tenant>.<session_id>``.

    A command is sent again, under the same command id (a host applies it once and answers a
    repeat with its first answer), when no host answers within a try (1 s, then 2 s, 4 s...:
    the host that had it may have died) and, after a short pause, when no host serves the
    subject ("no responders": hosts restarting) or the connection is down, until ``timeout``
    seconds have passed; then :class:`~blackbird.errors.CommandTimeoutError`.
    """

    def __init__(self, nc: NATS, subjects: Subjects, timeout: float) -> None:
        self._nc = nc
        self._subjects = subjects
        self._timeout = timeout
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(CommandReply).decode

    async def dispatch(
        self, tenant: str, session_id: str, command: SessionCommand, command_id: str, principal: str
    ) -> CommandReply:
        body = self._encode(CommandRequest(command=command, command_id=command_id, principal=principal))
        # a query goes where reads go: read-only credentials may ask it
        query = isinstance(command, GetSession)
        subject = (self._subjects.query if query else self._subjects.command)(tenant, session_id)
        deadline = time.monotonic() + self._timeout
        per_try = _FIRST_TRY
        attempt = 0
        why = "no answer"
        while (remaining := deadline - time.monotonic()) > 0.01:
            try:
                msg = await self._nc.request(subject, body, timeout=min(per_try, remaining))
            except nats.errors.TimeoutError:  # the host may have died with it: send it again
                per_try *= 2
                why = "no answer"
                continue
            except nats.errors.Error as exc:
                if not transient(exc):
                    raise typed(exc, f"command to {subject}") from None
                why = "no actor host serves it" if isinstance(exc, nats.errors.NoRespondersError) else describe(exc)
                await anyio.sleep(min(backoff(attempt), max(0.0, deadline - time.monotonic())))
                attempt += 1
                continue
            try:
                return self._decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise LogError(f"command to {subject}: the answer is not a CommandReply ({exc})") from None
        raise CommandTimeoutError(
            f"command {command_id!r} on {subject}: no actor host answered within {self._timeout:g}s "
            f"({why}); is `blackbird serve` running? It may or may not have been applied: retry "
            "with the same command id",
            subject=subject,
            command_id=command_id,
        )
