"""Recall's query embedding, on a real nats-server and real LanceDB: done in a worker thread,
shared by recalls of the same text (a cancelled one leaves it to the others), never started for
bad input, and not kept when it fails."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence

import anyio
import numpy as np
import pytest

from blackbird import AsyncBlackbird, ValidationError
from blackbird.errors import EmbedderError

from .conftest import NatsServer
from .embedders import HashEmbedder

pytestmark = pytest.mark.anyio


class GatedEmbedder(HashEmbedder):
    """A HashEmbedder that records the texts it is asked to embed, holds its worker thread while
    ``gate`` is cleared, and raises EmbedderError while ``failing`` is set."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.failing = False

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.started.set()
        self.gate.wait()
        if self.failing:
            raise EmbedderError("embedding request to test failed: refused", url="test", reason="refused")
        return super().embed(texts)

    def hold(self) -> None:
        """Hold the next embeddings until ``gate`` is set; ``started`` tells when one began."""
        self.started.clear()
        self.gate.clear()

    def queries(self, text: str) -> int:
        return sum(call == [text] for call in self.calls)


@pytest.fixture
async def gated(nats_server: NatsServer) -> AsyncIterator[tuple[AsyncBlackbird, GatedEmbedder, str]]:
    embedder = GatedEmbedder()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", embedder=embedder) as bb:
        session = await bb.session_manager.create_session("u1", tier="pro")
        await bb.memory.remember("The cello lessons are on Thursday evenings.", session_id=session.session_id)
        yield bb, embedder, session.session_id


async def test_bad_recall_input_is_refused_before_the_query_is_embedded(
    gated: tuple[AsyncBlackbird, GatedEmbedder, str],
) -> None:
    bb, embedder, sid = gated
    for kwargs, field in [({"k": 0}, "k"), ({"expand": 2}, "expand"), ({"scopes": "user"}, "scopes"),
                          ({"weights": {"colour": 1}}, "weights"), ({"filters": {"colour": "red"}}, "filters")]:
        with pytest.raises(ValidationError) as err:
            await bb.memory.recall("When are the lessons?", session_id=sid, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field
    assert embedder.queries("When are the lessons?") == 0


async def test_recalls_of_one_text_share_its_embedding(gated: tuple[AsyncBlackbird, GatedEmbedder, str]) -> None:
    bb, embedder, sid = gated
    found: list[list[str]] = []

    async def recall() -> None:
        found.append([m.text for m in await bb.memory.recall("When are the cello lessons?", session_id=sid)])

    embedder.hold()
    async with anyio.create_task_group() as tg:
        tg.start_soon(recall)
        await anyio.to_thread.run_sync(embedder.started.wait)  # the first one is embedding it
        tg.start_soon(recall)
        tg.start_soon(recall)
        embedder.gate.set()
    assert found == [["The cello lessons are on Thursday evenings."]] * 3
    assert embedder.queries("When are the cello lessons?") == 1


async def test_a_cancelled_recall_leaves_the_shared_embedding_to_the_others(
    gated: tuple[AsyncBlackbird, GatedEmbedder, str],
) -> None:
    bb, embedder, sid = gated
    found: list[str] = []
    first = anyio.CancelScope()

    async def recall() -> None:
        found.extend(m.text for m in await bb.memory.recall("Which day is the cello?", session_id=sid))

    async def cancelled_recall() -> None:
        with first:
            await recall()

    embedder.hold()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_recall)
        await anyio.to_thread.run_sync(embedder.started.wait)  # it is embedding the query
        tg.start_soon(recall)
        first.cancel()
        embedder.gate.set()
    assert first.cancelled_caught
    assert found == ["The cello lessons are on Thursday evenings."]  # the second recall's
    await bb.memory.recall("Which day is the cello?", session_id=sid)  # kept for a third one too
    assert embedder.queries("Which day is the cello?") == 1


async def test_a_failed_query_embedding_is_raised_and_not_kept(
    gated: tuple[AsyncBlackbird, GatedEmbedder, str],
) -> None:
    bb, embedder, sid = gated
    embedder.failing = True
    with pytest.raises(EmbedderError):
        await bb.memory.recall("Thursday evenings?", session_id=sid)
    embedder.failing = False
    assert [m.text for m in await bb.memory.recall("Thursday evenings?", session_id=sid)] == [
        "The cello lessons are on Thursday evenings."
    ]
    assert embedder.queries("Thursday evenings?") == 2
