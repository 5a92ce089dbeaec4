"""The client's header parsing (blackbird._nats.Connection) gives what nats-py's own does, for
every header block: the NATS wire's shape and arbitrary bytes alike."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from blackbird._nats import Connection

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
