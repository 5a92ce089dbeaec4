"""The client's header parsing (blackbird._nats.Connection) gives what nats-py's own does, for
every header block: the NATS wire's shape and arbitrary bytes alike; a subscription delivered
directly gets its plain messages through its handler, the rest through its callback."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg

from blackbird._nats import Connection

from .conftest import NatsServer

names = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=12) | st.sampled_from(
    ["Nats-Msg-Id", "Nats-Expected-Last-Subject-Sequence", "Status", " Padded ", "a b", "x\x1c", "\x1c", ""]
)
values = st.text(max_size=20) | st.sampled_from(["1234", " spaced ", "\u00e9t\u00e9", ""])
lines = st.builds(lambda n, sep, v: n.encode("utf-8", "surrogatepass") + sep + v.encode("utf-8", "surrogatepass"),
                  names, st.sampled_from([b":", b": ", b":\t", b""]), values)
blocks = st.lists(lines, max_size=6).map(lambda ls: b"\r\n".join(ls) + b"\r\n\r\n") | st.binary(max_size=80)


@settings(max_examples=600, deadline=None)
@given(raw=blocks)
def test_same_headers_as_nats_py(raw: bytes) -> None:
    assert Connection._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_a_commits_headers() -> None:
    raw = b"Nats-Msg-Id: s1:42\r\nNats-Expected-Last-Subject-Sequence: 7\r\n\r\n"
    assert Connection._parse_header_lines(raw) == {"Nats-Msg-Id": "s1:42", "Nats-Expected-Last-Subject-Sequence": "7"}


def test_the_stream_sequence_is_read_from_the_reply_subject_as_nats_py_reads_it() -> None:
    from nats.aio.msg import Msg

    from blackbird.journal import stream_seq

    for reply in (
        "$JS.ACK.BB.cons1.1.4242.17.1732600000000000000.3",  # without a domain
        "$JS.ACK.hub.ACCHASH.BB.cons1.1.4242.17.1732600000000000000.3.token",  # with one
        "$JS.ACK._.ACCHASH.BB.cons1.2.77.9.1732600000000000000.0",
    ):
        msg = Msg(_client=None, subject="bb.t.session.s", reply=reply)  # type: ignore[arg-type]
        assert stream_seq(msg) == msg.metadata.sequence.stream


@pytest.mark.anyio
async def test_a_subscription_delivered_directly_hands_plain_messages_to_its_handler(nats_server: NatsServer) -> None:
    """Plain messages reach the handler from the reader; one with headers (what a status is)
    reaches the subscription's callback; once unsubscribed, nothing reaches the handler."""
    nc = Connection()
    await nc.connect(nats_server.url)
    direct: list[tuple[bytes, bytes]] = []
    called: list[tuple[str, bytes, dict[str, str] | None]] = []
    both = anyio.Event()

    async def callback(msg: Msg) -> None:
        called.append((msg.subject, msg.data, msg.headers))
        if len(called) == 1 and direct:
            both.set()

    try:
        sub = await nc.subscribe("direct.*", cb=callback)
        nc.deliver_directly(sub, lambda subject, data: direct.append((subject, data)))
        await nc.publish("direct.a", b"plain")
        await nc.publish("direct.b", b"with headers", headers={"Status": "503"})
        with anyio.fail_after(5):
            await both.wait()
        assert direct == [(b"direct.a", b"plain")]
        assert called == [("direct.b", b"with headers", {"Status": "503"})]
        assert nc.stats["in_msgs"] == 2
        await sub.unsubscribe()
        echo = await nc.subscribe("direct.*")  # the same subject, a new subscription
        await nc.publish("direct.c", b"after")
        assert (await echo.next_msg(timeout=5)).data == b"after"
        assert direct == [(b"direct.a", b"plain")]
    finally:
        await nc.close()
