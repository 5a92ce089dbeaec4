"""The stream reader's backlog (pure): whatever the traffic, the reader's pace and where it
disconnects, resuming with the last token loses and repeats nothing; critical messages go first;
only superseded progress is ever skipped."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from blackbird.errors import ValidationError
from blackbird.streams.backlog import WHOLE_COMMIT, Backlog, Position, Resume, parse_resume


@dataclass(frozen=True)
class Msg:
    sequence: int
    index: int
    channel: str


CHANNELS = st.sampled_from(["chat", "chat", "progress", "notification", "other"])
# a log: commits of 0..3 messages (0: a commit of another kind)
LOGS = st.lists(st.lists(CHANNELS, max_size=3), min_size=1, max_size=25)
# the reader: after each commit read, how many messages it takes (maybe none)
PACES = st.lists(st.integers(0, 3), min_size=25, max_size=25)


def messages(log: list[list[str]]) -> list[Msg]:
    return [Msg(seq, i, ch) for seq, commit in enumerate(log, start=1) for i, ch in enumerate(commit)]


def run(
    log: list[list[str]], resume: Resume, pace: list[int], stop_after: int | None, *, eager: bool = False
) -> tuple[list[Msg], str | None, Backlog]:
    """Read the log into a backlog, taking ``pace[k]`` messages after commit k (``eager``: each
    message as soon as it is pushed); stop (disconnect) after ``stop_after`` taken. Returns what
    was taken and the last token."""
    backlog = Backlog(resume, critical=["notification"], coalesce=["progress"])
    taken: list[Msg] = []
    token = None

    def take(n: int) -> bool:
        nonlocal token
        for _ in range(n):
            if not len(backlog):
                return False
            # critical first: if any critical waits, the one handed out is critical
            critical_waiting = any(m.channel == "notification" for m in backlog._pending)
            message, token = backlog.pop()
            assert message.channel == "notification" or not critical_waiting
            taken.append(message)
            if stop_after is not None and len(taken) >= stop_after:
                return True
        return False

    for seq, commit in enumerate(log, start=1):
        for i, channel in enumerate(commit):
            if resume.due(Position(seq, i)):
                backlog.push(Msg(seq, i, channel))
                if eager:
                    take(1)
        backlog.seen(Position(seq, WHOLE_COMMIT))
        if take(pace[seq - 1]):
            return taken, token, backlog
    take(10**6)  # the reader catches up at the end
    return taken, token, backlog


@settings(max_examples=400, deadline=None)
@given(LOGS, PACES, PACES, st.data())
def test_resuming_with_the_last_token_loses_and_repeats_nothing(
    log: list[list[str]], pace1: list[int], pace2: list[int], data: st.DataObject
) -> None:
    everything = messages(log)
    # where the reader disconnects, drawn within what there is to read (0: it never does)
    inside = st.integers(1, len(everything) - 1) if len(everything) >= 2 else st.integers(0, len(everything))
    stop_after = data.draw(inside | st.integers(0, len(everything)), label="stop_after")
    event("disconnects before the end" if 0 < stop_after < len(everything) else "never disconnects")
    first, token, _ = run(log, parse_resume(None), pace1, stop_after or None)
    resume = parse_resume(token) if token is not None else parse_resume(None)
    second, _, _ = run(log, resume, pace2, None)
    got = first + second
    positions = [(m.sequence, m.index) for m in got]
    assert len(positions) == len(set(positions)), "a message was handed out twice"
    handed = set(positions)
    for m in everything:
        if m.channel != "progress":
            assert (m.sequence, m.index) in handed, f"{m} was lost"
    # the last progress message of the log is never superseded: it always arrives
    progress = [m for m in everything if m.channel == "progress"]
    if progress:
        assert (progress[-1].sequence, progress[-1].index) in handed


@settings(max_examples=200, deadline=None)
@given(LOGS)
def test_a_reader_that_keeps_up_gets_everything_in_log_order_with_plain_tokens(log: list[list[str]]) -> None:
    everything = messages(log)
    taken, token, _ = run(log, parse_resume(None), [0] * 25, None, eager=True)
    assert taken == everything
    if taken:
        assert token is not None and "+" not in token


def test_tokens_round_trip_and_bad_ones_name_the_field() -> None:
    resume = parse_resume("12-3+15-0+14")
    assert resume == Resume(Position(12, 3), frozenset({Position(15, 0), Position(14, WHOLE_COMMIT)}))
    assert parse_resume(resume.token()) == resume
    assert parse_resume("12-3 15-0") == parse_resume("12-3+15-0")  # "+" decoded as a space
    assert parse_resume(7) == Resume(Position(7, WHOLE_COMMIT), frozenset())
    assert parse_resume("3-1+2-0").done == frozenset()  # at or before the watermark: already done
    for bad in ("x", "1-2-3", "-1", "1+", True, -4, 2.5, "1-x+2"):
        with pytest.raises(ValidationError) as info:
            parse_resume(bad, "Last-Event-ID")
        assert info.value.fields["field"] == "Last-Event-ID"
