"""Full-text (keyword) ranking of a memory scope's current rows with Okapi BM25.

The inverted index is kept in memory beside the scope's vectors.

Terms are made the way the LanceDB (tantivy) full-text index of the memory tables makes them
(``FTS()`` defaults): split on anything not a letter or digit, lower-cased, folded to ASCII,
English stop words dropped, tokens longer than 40 characters dropped, Snowball English stems.
Scores use tantivy's BM25 (k1 = 1.2, b = 0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))).

:class:`KeywordIndex` is plain data with no I/O and no locking: its owner serialises access.
"""

from __future__ import annotations

import functools
import heapq
import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple

K1 = 1.2
B = 0.75
MAX_TOKEN_LENGTH = 40
# tantivy's (and Lucene's) English stop words
STOP_WORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
))
_TOKEN = re.compile(r"[^\W_]+")
_stemmers = threading.local()  # a Snowball stemmer keeps state between calls: one per thread


@functools.lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    stemmer = getattr(_stemmers, "english", None)
    if stemmer is None:
        import snowballstemmer

        stemmer = _stemmers.english = snowballstemmer.stemmer("english")
    return stemmer.stemWord(word)  # type: ignore[no-any-return]


def _fold(text: str) -> str:
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def terms(text: str) -> list[str]:
    """The index terms of ``text``, in order (repeats kept)."""
    out = []
    for token in _TOKEN.findall(_fold(text).lower()):
        if token not in STOP_WORDS and len(token) <= MAX_TOKEN_LENGTH:
            out.append(_stem(token))
    return out


class KeywordIndex:
    """BM25 over a changing set of documents (memory id -> text)."""

    __slots__ = ("_lengths", "_postings", "_terms", "_total")

    def __init__(self, documents: Iterable[tuple[str, str]] = ()) -> None:
        self._postings: dict[str, dict[str, int]] = {}  # term -> {doc id: term frequency}
        self._lengths: dict[str, int] = {}  # doc id -> number of terms
        self._terms: dict[str, tuple[str, ...]] = {}  # doc id -> its distinct terms
        self._total = 0  # sum of the lengths
        for doc_id, text in documents:
            self.put(doc_id, text)

    def __len__(self) -> int:
        return len(self._lengths)

    def put(self, doc_id: str, text: str) -> None:
        """Index ``text`` as ``doc_id`` (replacing what it held)."""
        self.drop(doc_id)
        counts = Counter(terms(text))
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[doc_id] = tf
        length = sum(counts.values())
        self._lengths[doc_id] = length
        self._terms[doc_id] = tuple(counts)
        self._total += length

    def drop(self, doc_id: str) -> None:
        """Forget ``doc_id`` (nothing happens if it is not indexed)."""
        length = self._lengths.pop(doc_id, None)
        if length is None:
            return
        self._total -= length
        for term in self._terms.pop(doc_id):
            docs = self._postings[term]
            del docs[doc_id]
            if not docs:
                del self._postings[term]

    def stats(self, query_terms: Iterable[str]) -> Corpus:
        """This index's corpus statistics for ``query_terms`` (add several indexes' together
        to score them as one corpus)."""
        df = {t: len(self._postings[t]) for t in set(query_terms) if t in self._postings}
        return Corpus(len(self._lengths), self._total, df)

    def scores(self, query_terms: Iterable[str], corpus: Corpus | None = None) -> dict[str, float]:
        """BM25 score of every document holding a query term, against ``corpus`` (by default
        this index's own statistics)."""
        query_terms = set(query_terms)
        corpus = corpus or self.stats(query_terms)
        if not corpus.documents:
            return {}
        average = corpus.terms / corpus.documents
        out: dict[str, float] = {}
        # The loop below runs once per posting: what does not change within it is computed
        # once per term or per document, with the same operations in the same order as
        # idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / average)), so the same floats.
        lengths, get = self._lengths, out.get
        k1, b, k1_plus_1 = K1, B, K1 + 1.0
        norms: dict[str, float] = {}  # doc id -> K1 * (1 - B + B * length / average)
        for term in query_terms:
            postings = self._postings.get(term)
            if not postings:
                continue
            df = corpus.df[term]
            idf = math.log(1.0 + (corpus.documents - df + 0.5) / (df + 0.5))
            numerators: dict[int, float] = {}  # tf -> idf * tf * (K1 + 1)
            for doc_id, tf in postings.items():
                numerator = numerators.get(tf)
                if numerator is None:
                    numerator = numerators[tf] = idf * tf * k1_plus_1
                if average:
                    norm = norms.get(doc_id)
                    if norm is None:
                        norm = norms[doc_id] = k1 * (1.0 - b + b * lengths[doc_id] / average)
                    out[doc_id] = get(doc_id, 0.0) + numerator / (tf + norm)
                else:
                    out[doc_id] = get(doc_id, 0.0) + numerator / (tf + k1)
        return out


class Corpus(NamedTuple):
    """What BM25 needs to know about the whole corpus: documents, their total terms, and the
    document frequency of each query term."""

    documents: int
    terms: int
    df: dict[str, int]

    def __add__(self, other: object) -> Corpus:
        if not isinstance(other, Corpus):
            return NotImplemented
        df = dict(self.df)
        for term, count in other.df.items():
            df[term] = df.get(term, 0) + count
        return Corpus(self.documents + other.documents, self.terms + other.terms, df)


def search(
    indexes: Iterable[KeywordIndex], query: str, limit: int, keep: Callable[[str], bool] | None = None
) -> list[str]:
    """Ids of the ``limit`` best documents for ``query`` across ``indexes`` scored as one corpus,
    best first (ties by id); with ``keep``, of the documents it accepts (scored against the
    whole corpus all the same)."""
    indexes = list(indexes)
    query_terms = set(terms(query))
    if not query_terms:
        return []
    corpus = Corpus(0, 0, {})
    for ix in indexes:
        corpus = corpus + ix.stats(query_terms)
    found = [scores for ix in indexes if (scores := ix.scores(query_terms, corpus))]
    scored: dict[str, float] = found[0] if len(found) == 1 else {}  # (0.0 + a score is that score)
    for scores in found if len(found) > 1 else ():
        for doc_id, score in scores.items():
            scored[doc_id] = scored.get(doc_id, 0.0) + score
    if keep is not None:
        scored = {doc_id: score for doc_id, score in scored.items() if keep(doc_id)}
    if len(scored) > limit > 0:
        # only the documents that can be among the best need the (slow, keyed) sort below: those
        # scoring at least the limit-th best score, less the rounding the sort compares at
        floor = heapq.nlargest(limit, scored.values())[-1] - 2e-9
        scored = {doc_id: score for doc_id, score in scored.items() if score >= floor}
    # Scores equal in exact arithmetic can differ in the last bits with the order the terms were
    # added in: compare them to 1e-9 so such ties fall to the id, the same on every path.
    return sorted(scored, key=lambda d: (-round(scored[d], 9), d))[:limit]
