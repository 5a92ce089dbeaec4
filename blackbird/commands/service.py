"""The NATS command service: actor hosts answer ``<prefix>cmd.<tenant>.<session_id>`` requests.

Hosts subscribe in one queue group, so any number of processes share the load; optimistic
concurrency on the log keeps each session single-writer even when two hosts race. Every reply
is a JSON :class:`~actors.events.CommandReply`; malformed requests get a typed rejection that
names the offending field, never a silent drop.
"""

from __future__ import annotations

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.events import CommandReply, CommandRequest, Rejection
from blackbird.commands.dispatch import Dispatcher, rejection_from_error
from blackbird.errors import BlackbirdError, field_of
from blackbird.ids import new_id
from blackbird.subjects import Subjects

log = structlog.get_logger("blackbird.service")


class CommandService:
    """Serves session commands from NATS until cancelled."""

    def __init__(self, nc: NATS, subjects: Subjects, dispatcher: Dispatcher, queue: str) -> None:
        self._nc = nc
        self._subjects = subjects
        self._dispatcher = dispatcher
        self._queue = queue
        self._decode = msgspec.json.Decoder(CommandRequest).decode
        self._encode = msgspec.json.Encoder().encode

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sub = await self._nc.subscribe(self._subjects.command_wildcard, queue=self._queue)
        log.info("command_service_started", subject=self._subjects.command_wildcard, queue=self._queue)
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                async for msg in sub.messages:
                    tg.start_soon(self._handle, msg)
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def _handle(self, msg: Msg) -> None:
        if not msg.reply:
            return
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
            field = field_of(exc, "body")
            return CommandReply(
                rejection=Rejection(
                    "validation_error", f"{field}: {exc}",
                    {"field": field, "expected": "a CommandRequest (see actors.events)"},
                )
            )
        except msgspec.DecodeError as exc:
            return CommandReply(
                rejection=Rejection(
                    "validation_error",
                    f"body: expected a JSON CommandRequest, {exc}",
                    {"field": "body", "expected": "JSON object"},
                )
            )
        command_id = request.command_id or new_id()
        return await self._dispatcher.dispatch(
            tenant, session_id, request.command, command_id, request.principal
        )
