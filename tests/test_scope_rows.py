"""The in-memory copy of a scope (pure): snapshots always show exactly the live memories, their
vectors row for row, and no later write (append, replace, drop, growth, compaction) changes a
snapshot taken before it."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from blackbird.memory.rows import LiveScope, ScopeRows

DIM = 4
IDS = st.sampled_from([f"m{i}" for i in range(40)])
OPS = st.lists(st.tuples(st.sampled_from(["put", "put", "drop"]), IDS, st.integers(0, 10**6)), max_size=300)


def row(memory_id: str, seed: int) -> dict[str, Any]:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return {"memory_id": memory_id, "text": f"memory {memory_id} {seed % 7}", "vector": vector / np.linalg.norm(vector)}


def contents(snapshot: ScopeRows) -> dict[str, tuple[int, ...]]:
    """What a snapshot shows: memory id -> its vector (as exact float bits), alive rows only."""
    shown: dict[str, tuple[int, ...]] = {}
    for i, r in enumerate(snapshot.rows):
        assert (r is not None) == bool(snapshot.alive[i])
        if r is not None:
            assert snapshot.matrix is not None
            np.testing.assert_array_equal(snapshot.matrix[i], r["vector"])
            assert r["memory_id"] not in shown  # one row per memory
            shown[r["memory_id"]] = tuple(r["vector"].view(np.int32))
    return shown


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(IDS, st.integers(0, 10**6), max_size=20), OPS)
def test_snapshots_show_the_live_memories_and_never_change_afterwards(
    initial: dict[str, int], ops: list[tuple[str, str, int]]
) -> None:
    scope = LiveScope({mid: row(mid, seed) for mid, seed in initial.items()})
    live = {mid: tuple(row(mid, seed)["vector"].view(np.int32)) for mid, seed in initial.items()}
    taken: list[tuple[ScopeRows, dict[str, tuple[int, ...]]]] = []
    for op, mid, seed in ops:
        if op == "put":
            scope.put(row(mid, seed))
            live[mid] = tuple(row(mid, seed)["vector"].view(np.int32))
        else:
            scope.drop(mid)
            live.pop(mid, None)
        snapshot = scope.snapshot()
        assert contents(snapshot) == live
        assert len(snapshot) == len(live) == len(scope.rows) == len(scope.keywords)
        taken.append((snapshot, dict(live)))
    for snapshot, expected in taken:  # every earlier snapshot still shows what it showed
        assert contents(snapshot) == expected


def test_dead_rows_never_match_and_an_empty_scope_has_no_similarities() -> None:
    scope = LiveScope({})
    assert scope.snapshot().similarity(np.ones(DIM, np.float32) / 2).shape == (0,)
    assert scope.snapshot().similarity(np.ones((3, DIM), np.float32) / 2).shape == (0, 3)
    first, second = row("a", 1), row("b", 2)
    scope.put(first)
    scope.put(second)
    scope.drop("a")
    snapshot = scope.snapshot()
    similarity = snapshot.similarity(first["vector"])
    assert similarity[0] == -np.inf  # "a" left: even its own vector does not find it
    assert similarity[1] == np.float32(second["vector"] @ first["vector"])
    assert snapshot.similarity(np.stack([first["vector"]] * 2)).shape == (2, 2)


def test_superseded_rows_are_kept_for_the_past_and_leave_with_a_forget() -> None:
    scope = LiveScope({})
    old, new, other = dict(row("a", 1), valid_from=10.0), dict(row("b", 2), valid_from=20.0), row("c", 3)
    scope.put(old)
    before = scope.snapshot()
    scope.put(new)
    scope.retire("a", 20.0)
    snapshot = scope.snapshot()
    assert "a" not in scope.rows and scope.past["a"]["valid_to"] == 20.0 and len(scope) == 2
    assert len(before.past) == 0  # an earlier snapshot does not change
    assert [r["memory_id"] for r in snapshot.past.rows] == ["a"]
    assert snapshot.similarity(old["vector"])[0] == -np.inf  # not current any more
    assert snapshot.past.similarity_at(old["vector"], 15.0)[0] == np.float32(old["vector"] @ old["vector"])
    assert snapshot.past.similarity_at(old["vector"], 20.0)[0] == -np.inf  # valid_to excluded
    assert snapshot.past.similarity_at(old["vector"], 5.0)[0] == -np.inf  # not valid yet
    assert snapshot.similarity_at(new["vector"], 15.0)[-1] == -np.inf
    assert len(scope.past_keywords) == 1 and len(scope.keywords) == 1
    scope.supersede(dict(other, valid_from=1.0, valid_to=2.0))  # superseded in the batch it came in
    scope.drop("a")
    scope.drop("c")
    assert scope.past == {} and len(scope.past_keywords) == 0 and len(scope.snapshot().past) == 0
