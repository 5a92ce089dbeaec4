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
* Ordered delivery (:meth:`Connection.deliver_ordered_directly`): the same for the commits an
  ordered consumer pushes (a live feed of the log: one per host for its followers, one per
  followed session for streams), with nats-py's ordered-consumer bookkeeping kept; heartbeats,
  flow control and a gap (which makes nats-py make the consumer again) still take nats-py's way.
  Measured here: about half of a follower's ~13 µs per commit was that object, queue and trip.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.subscription import Subscription

_CRLF = b"\r\n"

DirectHandler = Callable[[bytes, bytes], None]
"""Takes a directly delivered message's subject and payload; must not block or raise."""

OrderedHandler = Callable[[bytes, int, bytes], None]
"""Takes a directly delivered commit's subject, stream sequence and payload; must not block or raise."""

_ACK = (b"$JS", b"ACK")
_ORDERED_STATE = ("_dseq", "_sseq", "_active", "_ordered", "track_sequences")  # nats-py's, kept up to date


def _core(sub: Subscription) -> Subscription:
    """The client's own subscription behind ``sub`` (JetStream's push subscription wraps one)."""
    inner = getattr(sub, "_sub", None)
    return inner if isinstance(inner, Subscription) else sub


class Connection(Client):
    """nats-py's client; header parsing is faster (same result), and a subscription may be
    delivered directly."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectHandler] = {}
        # by subscription, not sid: nats-py gives an ordered consumer's subscription a new sid
        # when it makes the consumer again
        self._ordered: dict[Subscription, OrderedHandler] = {}

    def deliver_directly(self, sub: Subscription, handler: DirectHandler) -> None:
        """Hand ``sub``'s messages without headers to ``handler(subject, payload)`` as they are
        read, instead of to its callback. Messages with headers (statuses such as 503 "no
        responders") still go to the callback, as do all of them once ``sub`` is unsubscribed."""
        self._direct[sub._id] = handler

    def deliver_ordered_directly(self, sub: Subscription, handler: OrderedHandler) -> bool:
        """Hand the messages with a payload that ordered consumer ``sub`` delivers in order to
        ``handler(subject, stream_sequence, payload)`` as they are read, doing the bookkeeping
        nats-py's own path does (consumer and stream sequences, activity, flow-control count).
        Heartbeats, flow-control requests, empty messages and one out of order (nats-py then
        makes the consumer again) still reach ``sub``'s callback. False, and nothing changed,
        if ``sub`` is not an ordered consumer of the kind this nats-py makes."""
        core = _core(sub)
        jsi = getattr(core, "_jsi", None)
        if jsi is None or not all(hasattr(jsi, name) for name in _ORDERED_STATE) or not jsi._ordered:
            return False
        self._ordered[core] = handler
        return True

    def stop_ordered_delivery(self, sub: Subscription) -> None:
        self._ordered.pop(_core(sub), None)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if self._ordered and data and self._ordered_directly(sid, subject, reply, data):
            return
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

    def _ordered_directly(self, sid: int, subject: bytes, reply: bytes, data: bytes) -> bool:
        sub = self._subs.get(sid)
        handler = self._ordered.get(sub) if sub is not None else None
        if handler is None or sub is None:
            return False
        tokens = reply.split(b".")
        if len(tokens) < 9 or (tokens[0], tokens[1]) != _ACK:
            return False
        jsi = sub._jsi
        if jsi is None:  # registered as an ordered consumer's: never
            return False
        # nats-py reads the sequences at these places whatever the layout (and we with it)
        try:
            dseq, sseq = int(tokens[6]), int(tokens[5])
            seq = sseq if len(tokens) == 9 else int(tokens[7])  # as stream_seq(): a domain shifts it
        except ValueError:
            return False  # not a delivery's reply: nats-py's way, as before
        if dseq != jsi._dseq:
            return False  # out of order: nats-py makes the consumer again
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        sub._received += 1
        jsi._active = True
        jsi._dseq = dseq + 1
        jsi._sseq = sseq
        jsi.track_sequences(reply.decode())
        handler(subject, seq, data)
        return True

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
