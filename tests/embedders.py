"""Test embedders: deterministic and offline, for tests that need vectors but not meaning."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


class HashEmbedder:
    """Deterministic unit vectors from a text's hash: distinct texts are far apart (no
    near-duplicate merging), and no model is loaded."""

    model_id = "test/hash-64"
    dimension = 64

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        seeds = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest()) for t in texts]
        rows = [np.random.default_rng(seed).standard_normal(64) for seed in seeds]
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(texts), 64)
        unit: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        return unit
