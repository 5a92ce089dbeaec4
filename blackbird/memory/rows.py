"""The in-memory copy of a memory scope's rows, read by recall and the duplicate check.

The current rows' vectors are in one matrix, their texts in a keyword index. The superseded rows
(``valid_to`` set) are kept beside them, with their own keyword index and a matrix stacked when a
recall ``as_of`` an earlier instant first needs it: the past is answered in memory too.

:class:`LiveScope` changes in place as the index applies batches; :class:`ScopeRows` is an
immutable snapshot of it for one search. A write costs O(1) amortised (a vector is appended to
a matrix with spare capacity; a memory that leaves is only marked dead), and a snapshot costs a
copy of the row list, not a new matrix: a scope of 100,000 memories is not restacked (150 MB)
after every write. Dead rows are dropped once they are a quarter of the matrix.

Plain data with no I/O and no locking: the memory index serialises access.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from blackbird.memory.fulltext import KeywordIndex

Row = dict[str, Any]
_MIN_CAPACITY = 16
_MIN_DEAD = 64  # dead rows tolerated before a compaction is considered


class ScopeRows:
    """A snapshot of a scope: ``matrix`` (n x dimension, None when n is 0), ``rows`` (n row
    dicts, None where the memory left before the snapshot) and ``alive`` (n booleans, False
    where ``rows`` is None). Later writes never change it."""

    __slots__ = ("_valid_from", "alive", "matrix", "past", "rows", "scope")

    def __init__(
        self, scope: LiveScope, rows: list[Row | None], matrix: npt.NDArray[np.float32] | None,
        alive: npt.NDArray[np.bool_], past: PastRows,
    ) -> None:
        self.scope = scope  # the live scope, for its keyword indexes (read under the index's lock)
        self.rows = rows
        self.matrix = matrix
        self.alive = alive
        self.past = past  # the superseded rows when the snapshot was taken
        self._valid_from: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        """Memories alive in the snapshot."""
        return int(self.alive.sum())

    def similarity(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Cosine similarity of every row (dead rows: -inf) to each of ``vectors`` (unit rows),
        shape (n, len(vectors)); for one 1-D vector, shape (n,)."""
        if self.matrix is None:
            return np.zeros((0,) + vectors.shape[:-1][:1], np.float32)
        out = self.matrix @ vectors.T
        out[~self.alive] = -np.inf
        return out

    def similarity_at(self, vector: npt.NDArray[np.float32], at: float) -> npt.NDArray[np.float32]:
        """:meth:`similarity` of one vector, -inf for the rows not valid yet at ``at``."""
        out = self.similarity(vector)
        if len(out):
            if self._valid_from is None:  # computed once per snapshot, on the first recall as_of
                self._valid_from = np.array([r["valid_from"] if r else np.inf for r in self.rows], np.float64)
            out[self._valid_from > at] = -np.inf
        return out


class PastRows:
    """The superseded rows of a scope at one moment (immutable): ``rows``, and their matrix and
    validity intervals, stacked on first use."""

    __slots__ = ("_matrix", "_valid_from", "_valid_to", "rows")

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self._matrix: npt.NDArray[np.float32] | None = None
        self._valid_from: npt.NDArray[np.float64] | None = None
        self._valid_to: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def similarity_at(self, vector: npt.NDArray[np.float32], at: float) -> npt.NDArray[np.float32]:
        """Cosine similarity of every row to ``vector`` (a unit vector), -inf for the rows not
        valid at ``at`` (valid from ``valid_from`` up to, not including, ``valid_to``)."""
        if not self.rows:
            return np.zeros(0, np.float32)
        if self._matrix is None:  # two threads may both stack it: the same result
            self._valid_from = np.array([r["valid_from"] for r in self.rows], np.float64)
            self._valid_to = np.array([r["valid_to"] for r in self.rows], np.float64)
            self._matrix = np.stack([r["vector"] for r in self.rows]).astype(np.float32, copy=False)
        assert self._valid_from is not None and self._valid_to is not None
        out = self._matrix @ vector
        out[(self._valid_from > at) | (self._valid_to <= at)] = -np.inf
        return out


class LiveScope:
    """A scope's rows, current and superseded, kept in step with the log by the memory index."""

    __slots__ = (
        "_alive", "_matrix", "_n", "_order", "_past_rows", "_slots", "_snapshot", "keywords", "past",
        "past_keywords", "rows",
    )

    def __init__(self, rows: dict[str, Row], past: dict[str, Row] | None = None) -> None:
        self.rows = rows  # memory id -> row (the current ones only)
        self.keywords = KeywordIndex((memory_id, row["text"]) for memory_id, row in rows.items())
        self.past = past or {}  # memory id -> row (superseded: valid_to set)
        self.past_keywords = KeywordIndex((memory_id, row["text"]) for memory_id, row in self.past.items())
        self._past_rows: PastRows | None = None
        self._snapshot: ScopeRows | None = None
        self._rebuild()

    def __len__(self) -> int:
        """Rows held, current and superseded (what counts against the index's row budget)."""
        return len(self.rows) + len(self.past)

    def _rebuild(self) -> None:
        """Lay the live rows out afresh: no dead rows, spare capacity for appends."""
        live = list(self.rows.values())
        self._order: list[Row | None] = list(live)  # matrix row i is _order[i]
        self._slots = {row["memory_id"]: i for i, row in enumerate(live)}
        self._n = len(live)
        self._matrix: npt.NDArray[np.float32] | None = None
        self._alive = np.ones(max(_MIN_CAPACITY, 2 * self._n), bool)
        if live:
            self._matrix = np.empty((len(self._alive), len(live[0]["vector"])), np.float32)
            self._matrix[: self._n] = [row["vector"] for row in live]
        self._snapshot = None

    def put(self, row: Row) -> None:
        """Add a current memory, or replace the one with its id."""
        memory_id = row["memory_id"]
        self._forget_past(memory_id)
        self._kill(memory_id)
        self.rows[memory_id] = row
        self.keywords.put(memory_id, row["text"])
        if self._matrix is None:
            self._matrix = np.empty((len(self._alive), len(row["vector"])), np.float32)
        if self._n == len(self._matrix):
            # a new array: snapshots keep viewing the old one
            grown = np.empty((2 * self._n, self._matrix.shape[1]), np.float32)
            grown[: self._n] = self._matrix[: self._n]
            alive = np.ones(2 * self._n, bool)
            alive[: self._n] = self._alive[: self._n]
            self._matrix, self._alive = grown, alive
        # beyond every snapshot's rows: writing here changes none of them
        self._matrix[self._n] = row["vector"]
        self._alive[self._n] = True
        self._order.append(row)
        self._slots[memory_id] = self._n
        self._n += 1
        self._snapshot = None

    def drop(self, memory_id: str) -> None:
        """Remove a memory, current or superseded (forgotten, expired, erased: gone from every
        instant); nothing happens if the scope does not hold it."""
        self._forget_past(memory_id)
        if self.rows.pop(memory_id, None) is None:
            return
        self.keywords.drop(memory_id)
        self._kill(memory_id)
        self._snapshot = None

    def supersede(self, row: Row) -> None:
        """Hold ``row`` (its ``valid_to`` set) as superseded, in place of the memory's current
        or superseded row."""
        memory_id = row["memory_id"]
        if self.rows.pop(memory_id, None) is not None:
            self.keywords.drop(memory_id)
            self._kill(memory_id)
        self.past[memory_id] = row
        self.past_keywords.put(memory_id, row["text"])
        self._past_rows = None
        self._snapshot = None

    def retire(self, memory_id: str, valid_to: float) -> None:
        """The memory's current row becomes superseded at ``valid_to`` (nothing happens if the
        scope does not hold it as current)."""
        row = self.rows.get(memory_id)
        if row is not None:
            self.supersede(dict(row, valid_to=valid_to))

    def _forget_past(self, memory_id: str) -> None:
        if self.past.pop(memory_id, None) is not None:
            self.past_keywords.drop(memory_id)
            self._past_rows = None
            self._snapshot = None

    def _kill(self, memory_id: str) -> None:
        slot = self._slots.pop(memory_id, None)
        if slot is None:
            return
        self._order[slot] = None
        # a fresh array, so a snapshot's ``alive`` is never changed under it
        self._alive = self._alive.copy()
        self._alive[slot] = False
        dead = self._n - len(self._slots)
        if dead > _MIN_DEAD and 4 * dead > self._n:
            self._rebuild()

    def snapshot(self) -> ScopeRows:
        if self._snapshot is None:
            n = self._n
            matrix = self._matrix[:n] if self._matrix is not None and n else None
            if self._past_rows is None:
                self._past_rows = PastRows(list(self.past.values()))
            self._snapshot = ScopeRows(self, self._order[:n], matrix, self._alive[:n], self._past_rows)
        return self._snapshot
