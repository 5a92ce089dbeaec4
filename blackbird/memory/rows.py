"""The in-memory copy of a memory scope's current rows, read by recall and the duplicate check.

Their vectors are in one matrix, their texts in a keyword index.

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

    __slots__ = ("alive", "matrix", "rows", "scope")

    def __init__(
        self, scope: LiveScope, rows: list[Row | None], matrix: npt.NDArray[np.float32] | None,
        alive: npt.NDArray[np.bool_],
    ) -> None:
        self.scope = scope  # the live scope, for its keyword index (read under the index's lock)
        self.rows = rows
        self.matrix = matrix
        self.alive = alive

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


class LiveScope:
    """A scope's current rows, kept in step with the log by the memory index."""

    __slots__ = ("_alive", "_matrix", "_n", "_order", "_slots", "_snapshot", "keywords", "rows")

    def __init__(self, rows: dict[str, Row]) -> None:
        self.rows = rows  # memory id -> row (the live ones only)
        self.keywords = KeywordIndex((memory_id, row["text"]) for memory_id, row in rows.items())
        self._snapshot: ScopeRows | None = None
        self._rebuild()

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
        """Add a memory, or replace the one with its id."""
        memory_id = row["memory_id"]
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
        """Remove a memory (nothing happens if the scope does not hold it)."""
        if self.rows.pop(memory_id, None) is None:
            return
        self.keywords.drop(memory_id)
        self._kill(memory_id)
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
            self._snapshot = ScopeRows(self, self._order[:n], matrix, self._alive[:n])
        return self._snapshot
