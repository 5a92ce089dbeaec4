"""Sending session commands to whichever actor host serves them, over NATS request/reply."""

from __future__ import annotations

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from actors.events import CommandReply, CommandRequest, SessionCommand
from blackbird.errors import CommandTimeoutError
from blackbird.subjects import Subjects


class RemoteDispatcher:
    """Sends commands to whichever actor host serves ``<prefix>cmd.<tenant>.<session_id>``."""

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
        subject = self._subjects.command(tenant, session_id)
        try:
            msg = await self._nc.request(subject, body, timeout=self._timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise CommandTimeoutError(
                f"no actor host answered on {subject} within {self._timeout}s "
                f"({type(exc).__name__}); is `blackbird serve` running?",
                subject=subject,
                command_id=command_id,
            ) from None
        return self._decode(msg.data)
