"""A raw nats-py connection that keeps the errors the server sends it (permission violations),
for tests that try what the SDK would refuse before sending."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
from nats.aio.client import Client as NATS


@dataclass
class Raw:
    """A raw nats-py connection and the errors the server sent it (permission violations)."""

    nc: NATS
    errors: list[str] = field(default_factory=list)
    disconnected: anyio.Event = field(default_factory=anyio.Event)
    _seen: anyio.Event = field(default_factory=anyio.Event)

    async def violation(self, text: str) -> str:
        """Wait (bounded) for the server's permissions violation mentioning ``text``."""
        with anyio.fail_after(5):
            while True:
                for e in self.errors:
                    if "permissions violation" in e.lower() and text.lower() in e.lower():  # nats-py lowercases it
                        return e
                self._seen = anyio.Event()
                await self._seen.wait()


async def raw_connect(url: str, **options: Any) -> Raw:
    """A connection to ``url`` with nats-py's ``connect()`` ``options`` (credentials, inbox
    prefix), not reconnecting, recording the server's errors."""
    box = Raw(nc=NATS())

    async def on_error(exc: Exception) -> None:
        box.errors.append(str(exc))
        box._seen.set()

    async def on_disconnected() -> None:
        box.disconnected.set()

    await box.nc.connect(url, error_cb=on_error, disconnected_cb=on_disconnected, allow_reconnect=False, **options)
    return box
