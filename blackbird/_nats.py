"""The NATS client Blackbird connects with: nats-py's, with two shortcuts on its inbound path.

* Header parsing at C speed. Every commit a follower reads (the abuse detector, the learner,
  projections, live feeds) arrives with the headers its append carried (``Nats-Msg-Id``,
  ``Nats-Expected-Last-Subject-Sequence``), and nats-py 2.16 checks each header name for
  whitespace one character at a time in a generator: measured here, a few microseconds per
  message, a tenth of a host's CPU per command with two followers.
  :meth:`Connection._parse_header_lines` gives the same result (a property test holds it to
  nats-py's own) with ``str.split``.
* Direct delivery (:meth:`Connection.deliver_directly`). nats-py hands every message to its
  subscription as a ``Msg`` object through a queue that a task of the subscription's own drains:
  for the acknowledgement of an append, which only completes a future, that is an object, a
  queue and a trip through the event loop per command. A subscription delivered directly has
  its plain messages (no headers) handed to a function by the reader itself.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.subscription import Subscription

_CRLF = b"\r\n"

DirectHandler = Callable[[bytes, bytes], None]
"""Takes a directly delivered message's subject and payload; must not block or raise."""


class Connection(Client):
    """nats-py's client; header parsing is faster (same result), and a subscription may be
    delivered directly."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectHandler] = {}

    def deliver_directly(self, sub: Subscription, handler: DirectHandler) -> None:
        """Hand ``sub``'s messages without headers to ``handler(subject, payload)`` as they are
        read, instead of to its callback. Messages with headers (statuses such as 503 "no
        responders") still go to the callback, as do all of them once ``sub`` is unsubscribed."""
        self._direct[sub._id] = handler

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        handler = self._direct.get(sid)
        if handler is None or headers or sid not in self._subs:
            if handler is not None and sid not in self._subs:
                del self._direct[sid]
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        handler(subject, data)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue  # a name that is not ASCII: skipped, as nats-py does
            if key and key.split() != [key]:
                continue  # whitespace inside a name (any str.isspace character): not a header
            out[key] = value.strip().decode("utf-8", "replace")
        return out
