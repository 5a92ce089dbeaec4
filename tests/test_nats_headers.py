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
