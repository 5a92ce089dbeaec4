"""all-MiniLM-L6-v2's encoder: its weights laid out for inference, and a plain-numpy forward pass.

:class:`MiniLMWeights` is read once from the model's safetensors; :class:`NumpyEncoder` runs BERT
over it in numpy (no torch, no compiled extension beyond numpy's BLAS).  The faster ONNX Runtime
encoder in ``_minilm_onnx.py`` is built from the same weights.  Both return mean-pooled, not yet
normalised, last hidden states; ``blackbird.embedding.MiniLMEmbedder`` tokenises, batches and
normalises around them.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


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


class MiniLMWeights(msgspec.Struct, frozen=True):
    """A BERT encoder's weights, as both encoders consume them."""

    word: Vectors  # (vocabulary, hidden)
    position: Vectors  # (positions, hidden), token type 0 folded in: every text is one segment
    emb_ln_w: Vectors
    emb_ln_b: Vectors
    layers: tuple[_Layer, ...]
    heads: int
    eps: float

    @property
    def hidden(self) -> int:
        return int(self.word.shape[1])

    @classmethod
    def from_state_dict(cls, w: dict[str, Vectors], config: dict[str, Any]) -> MiniLMWeights:
        """From a (``bert.``-prefixed or not) BERT state dict and its ``config.json``."""
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        scale = np.float32(1.0 / math.sqrt(hidden // heads))
        return cls(
            word=np.ascontiguousarray(w["embeddings.word_embeddings.weight"], np.float32),
            position=np.ascontiguousarray(
                w["embeddings.position_embeddings.weight"]
                + w["embeddings.token_type_embeddings.weight"][0],
                np.float32,
            ),
            emb_ln_w=w["embeddings.LayerNorm.weight"],
            emb_ln_b=w["embeddings.LayerNorm.bias"],
            layers=tuple(_layer(w, i, scale) for i in range(config["num_hidden_layers"])),
            heads=heads,
            eps=float(config["layer_norm_eps"]),
        )


class NumpyEncoder:
    """BERT forward pass in numpy; thread-safe (nothing is mutated after construction)."""

    name = "numpy"

    def __init__(self, weights: MiniLMWeights) -> None:
        self._w = weights

    def forward(self, ids: npt.NDArray[np.int64], mask: Vectors) -> Vectors:
        """Mean-pooled last hidden states (not normalised) of token ``ids`` (n, L) whose real
        tokens ``mask`` (n, L) marks with 1.0 (padding 0.0)."""
        w = self._w
        n, length = ids.shape
        hidden, heads = w.hidden, w.heads
        head_dim = hidden // heads
        padded = bool(mask.min() == 0.0)
        # additive attention bias: padding keys get a huge negative score, so softmax gives them 0
        bias = ((mask - 1.0) * np.float32(1e9))[:, None, None, :] if padded else None

        x = w.word[ids]
        x += w.position[:length]
        x = _layer_norm(x.reshape(n * length, hidden), w.emb_ln_w, w.emb_ln_b, w.eps)
        for layer in w.layers:
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
            x = _layer_norm(attended, layer.ln1_w, layer.ln1_b, w.eps)
            x = _layer_norm(_feed_forward(x, layer), layer.ln2_w, layer.ln2_b, w.eps)
        states = x.reshape(n, length, hidden)
        if not padded:
            return states.mean(axis=1)  # type: ignore[no-any-return]
        summed = np.einsum("nlh,nl->nh", states, mask)
        return summed / np.maximum(mask.sum(axis=1), 1e-9)[:, None]  # type: ignore[no-any-return]


def _feed_forward(x: Vectors, layer: _Layer) -> Vectors:
    """x + down(gelu(up(x))), a block of rows at a time so the 4x wider activations stay in
    the CPU cache (the elementwise GELU is memory-bound otherwise)."""
    out = np.empty_like(x)
    for start in range(0, x.shape[0], _FFN_ROWS):
        rows = x[start : start + _FFN_ROWS]
        block = _linear(_gelu(_linear(rows, layer.up_w, layer.up_b)), layer.down_w, layer.down_b)
        block += rows
        out[start : start + _FFN_ROWS] = block
    return out
