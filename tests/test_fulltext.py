"""The in-memory keyword index (BM25) a recall of the present uses: terms like LanceDB's full-text
index makes them, incremental updates equal to a rebuild, scores equal to the BM25 formula."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blackbird.memory.fulltext import K1, B, KeywordIndex, search, terms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The users are RUNNING", ["user", "run"]),  # stop words gone, lower-cased, stemmed
        ("Zürich café", ["zurich", "cafe"]),  # folded to ASCII
        ("ticket ZQ-88412, under_score!", ["ticket", "zq", "88412", "under", "score"]),
        ("a" * 41 + " kept", ["kept"]),  # tokens over 40 characters are dropped
        ("the and of", []),
        ("", []),
    ],
)
def test_terms_are_made_like_the_lancedb_full_text_index(text: str, expected: list[str]) -> None:
    assert terms(text) == expected


def reference_scores(docs: dict[str, str], query: str) -> dict[str, float]:
    """BM25 straight from its definition, over every document."""
    counted = {doc_id: Counter(terms(text)) for doc_id, text in docs.items()}
    if not counted:
        return {}
    average = sum(sum(c.values()) for c in counted.values()) / len(counted)
    out: dict[str, float] = {}
    for term in set(terms(query)):
        df = sum(1 for c in counted.values() if term in c)
        if not df:
            continue
        idf = math.log(1 + (len(counted) - df + 0.5) / (df + 0.5))
        for doc_id, c in counted.items():
            if term in c:
                length = sum(c.values())
                norm = K1 * (1 - B + B * length / average) if average else K1
                out[doc_id] = out.get(doc_id, 0.0) + idf * c[term] * (K1 + 1) / (c[term] + norm)
    return out


WORDS = st.sampled_from(
    ["alpha", "beta", "gamma", "delta", "running", "runs", "the", "of", "cafe", "café", "zeta"]
)
TEXTS = st.lists(WORDS, max_size=8).map(" ".join)
OPS = st.lists(
    st.tuples(st.sampled_from(["put", "drop"]), st.sampled_from("abcdefgh"), TEXTS), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(OPS, TEXTS)
def test_incremental_updates_score_like_bm25_over_the_final_documents(
    ops: list[tuple[str, str, str]], query: str
) -> None:
    index = KeywordIndex()
    docs: dict[str, str] = {}
    for op, doc_id, text in ops:
        if op == "put":
            index.put(doc_id, text)
            docs[doc_id] = text
        else:
            index.drop(doc_id)
            docs.pop(doc_id, None)
    assert len(index) == len(docs)
    got = index.scores(terms(query))
    expected = reference_scores(docs, query)
    assert got.keys() == expected.keys()
    for doc_id, score in expected.items():
        assert got[doc_id] == pytest.approx(score)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefgh"), TEXTS), st.dictionaries(st.sampled_from("ijklmn"), TEXTS), TEXTS)
def test_several_indexes_search_as_one_corpus(
    first: dict[str, str], second: dict[str, str], query: str
) -> None:
    split = search([KeywordIndex(first.items()), KeywordIndex(second.items())], query, 100)
    whole = search([KeywordIndex({**first, **second}.items())], query, 100)
    assert split == whole
    expected = reference_scores({**first, **second}, query)
    assert split == sorted(expected, key=lambda d: (-round(expected[d], 9), d))


def test_search_ranks_by_matched_rare_and_repeated_terms_and_honours_the_limit() -> None:
    index = KeywordIndex([
        ("common", "the meeting is on friday"),
        ("rare", "the dentist appointment is on friday"),
        ("twice", "dentist dentist reminder"),
        ("none", "nothing relevant here"),
    ])
    # both words, then the rarer word twice, then the commoner word once
    assert search([index], "dentist friday", 10) == ["rare", "twice", "common"]
    assert search([index], "dentist friday", 1) == ["rare"]
    assert search([index], "the of", 10) == []  # stop words only


DOCS = [
    "The runner was running fast", "Cafés in Zürich are cosy", "ticket ZQ-88412 under_review",
    "They will be there", "Generously funded projects", "an apple a day",
    "Connection connected connecting", "über cool straße",
]
QUERIES = [
    "run", "runs", "the", "zurich", "cafe", "zq", "88412", "review", "there", "generous",
    "apple", "connect", "uber", "strasse", "they will", "cosy runner",
]


def test_the_same_documents_match_as_in_a_real_lancedb_full_text_index(tmp_path: Path) -> None:
    import lancedb
    import pyarrow as pa
    from lancedb.index import FTS

    table = lancedb.connect(str(tmp_path)).create_table(
        "docs", pa.table({"id": [str(i) for i in range(len(DOCS))], "text": DOCS})
    )
    table.create_index("text", config=FTS(), replace=True)  # the memory tables' configuration
    ours = KeywordIndex((str(i), text) for i, text in enumerate(DOCS))
    for query in QUERIES:
        theirs = {row["id"] for row in table.search(query, query_type="fts").limit(50).to_list()}
        assert set(search([ours], query, 50)) == theirs, query


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(["tea", "coffee", "green", "black", "milk", "sugar"]), min_size=1, max_size=6),
             min_size=1, max_size=40),
    st.integers(1, 45),
    st.sets(st.integers(0, 39)),
)
def test_a_limit_or_a_filter_keeps_the_order_of_the_full_ranking(
    docs: list[list[str]], limit: int, dropped: set[int]
) -> None:
    index = KeywordIndex((f"d{i:02}", " ".join(words)) for i, words in enumerate(docs))
    everything = search([index], "green tea with milk", len(docs))
    assert search([index], "green tea with milk", limit) == everything[:limit]
    kept = [d for d in everything if int(d[1:]) not in dropped]
    assert search([index], "green tea with milk", limit, keep=lambda d: int(d[1:]) not in dropped) == kept[:limit]
