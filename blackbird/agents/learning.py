"""Learning across sessions: what users state about themselves becomes user-scope memories.

An :class:`Extractor` turns one of the user's messages into :class:`ExtractedFact` s (a key, a
standalone statement, a kind); a :class:`GraphExtractor` also turns it into
:class:`ExtractedRelation` s (subject, predicate, object) for the knowledge graph. Two ship, both
graph extractors: :class:`RuleExtractor` (offline, deterministic, English first-person
statements) and ``blackbird.agents.openai.OpenAIExtractor`` (a model's structured JSON output).

The :class:`Learner` runs on hosts, off the reply path: it follows every tenant's session
commits in the log and, for each message its session's own user posted on the ``chat``
channel, writes the extracted facts with ``memory.remember(..., scope="user", key=...)``. The
memory service does the rest: a near-duplicate updates the memory it repeats, a newer fact
with the same key supersedes the older one (``recall(as_of=...)`` still finds it). Then, with a
graph extractor, it writes the message's relations with ``memory.relate(...)`` (each pointing at
the memory of the fact it restates, its ``source``): the facts are remembered first, so what was
said is recallable before the graph has it. Its position in the log is checkpointed in the
projections' checkpoint store, so a restart resumes where it stopped instead of learning
everything again.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

import anyio
import anyio.abc
import msgspec
import structlog

from actors.events import MessagePosted
from blackbird.errors import (
    ClosedError,
    CommandTimeoutError,
    LogError,
    ProjectionTimeoutError,
)
from blackbird.sessions.gateway import acting_principal
from blackbird.subjects import Subjects
from projections.runner import Checkpoints, Waiters

if TYPE_CHECKING:
    from blackbird.journal import Entry, Journal
    from blackbird.memory.service import AsyncMemory
    from blackbird.streams.feeds import SharedLog
    from blackbird.types import Entity, Relation

__all__ = [
    "USER",
    "ExtractedFact",
    "ExtractedRelation",
    "Extractor",
    "GraphExtractor",
    "Learner",
    "RuleExtractor",
    "normal_predicate",
]

log = structlog.get_logger("blackbird.learning")


class ExtractedFact(msgspec.Struct, frozen=True):
    """One thing a user stated about themselves, ready to remember.

    ``key`` names what it is about ("name", "lives_in", "likes:coffee", "favourite:colour"): a
    later fact with the same key supersedes the earlier one. ``text`` is a standalone statement
    ("The user's name is Ada") that reads right when recalled out of its conversation."""

    key: str
    text: str
    kind: Literal["fact", "preference"]


#: The subject (or object) of an :class:`ExtractedRelation` that stands for the message's author.
USER = "@user"
#: The predicate that gives a name to its subject: ``ExtractedRelation(USER, NAMED, "Ada")`` makes
#: "Ada" an alias of the author's node (``note_entity``), not a relation to a node called "Ada".
NAMED = "named"

_PREDICATE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_NOT_SNAKE = re.compile(r"[^a-z0-9]+")


def normal_predicate(predicate: str) -> str | None:
    """``predicate`` as a knowledge-graph predicate (lower snake_case, ``^[a-z][a-z0-9_]{0,63}$``):
    ``"Lives In"`` -> ``lives_in``; None when nothing of it is left or it does not start with a
    letter."""
    snake = _NOT_SNAKE.sub("_", predicate.strip().lower()).strip("_")
    return snake if _PREDICATE.match(snake) else None


class ExtractedRelation(msgspec.Struct, frozen=True):
    """One fact for the knowledge graph that a message states: ``subject predicate object``.

    ``subject`` and ``object`` are names; :data:`USER` (``"@user"``) stands for the message's
    author, whose node is the entity named by their user id (a person). ``predicate`` is lower
    snake_case (:func:`normal_predicate`); the predicate :data:`NAMED` (``"named"``) is special:
    its object is a name of the subject, added as an alias, not a node of its own. Types are
    lower-case tokens: person, place, organization, role, thing. ``fact_key``: the key of the
    :class:`ExtractedFact` of the same message that states the same thing (its memory becomes the
    relation's ``source``); ``evidence``: the words of the message that state it."""

    subject: str
    predicate: str
    object: str
    subject_type: str = "person"
    object_type: str = "thing"
    fact_key: str | None = None
    evidence: str = ""


@runtime_checkable
class Extractor(Protocol):
    """Turns one message a user wrote into the facts and preferences it states."""

    async def extract(self, text: str, *, user_id: str) -> list[ExtractedFact]:
        """The facts ``text`` states about its author ``user_id`` (empty: none)."""
        ...


@runtime_checkable
class GraphExtractor(Extractor, Protocol):
    """An :class:`Extractor` that also finds the relations a message states, for the knowledge
    graph. The learner calls :meth:`extract` then :meth:`extract_relations` on the same message;
    an implementation that asks a model answers both from one call."""

    async def extract_relations(self, text: str, *, user_id: str) -> list[ExtractedRelation]:
        """The relations ``text`` states (empty: none); see :class:`ExtractedRelation`."""
        ...


# --------------------------------------------------------------------------- rule-based


_MAX_VALUE_WORDS = 8
_MAX_VALUE_CHARS = 80
# Words before a statement that do not change it ("Well, actually I live in Paris").
_FILLER = re.compile(
    r"^(?:(?:well|so|also|oh|ok|okay|btw|by the way|actually|and|but|now|hi|hello|hey|yes|yeah|"
    r"anyway|fyi|just so you know|for the record)\b[,\s]*)+",
    re.IGNORECASE,
)
# Where the value of a statement ends: a subordinate clause begins.
_VALUE_END = re.compile(
    r"\s+(?:because|since|but|although|though|which|who|where|when|while|so|and i|and my|as well)\b.*$"
    r"|\s+(?:last|next|this|these|ago|nowadays|anymore|for (?:\d+|a|an|many|several|the past))\b.*$"
    r"|\s*[(:;].*$|\s+[-\u2013\u2014]+\s.*$",
    re.IGNORECASE,
)
# Sentences: up to and including their end mark (a "?" marks a question, which states nothing).
_SENTENCE = re.compile(r"[^.!?;\n]+[.!?;\n]*")
# Verbs that go on with the clause's subject left out: "I live in Paris and work at Acme".
_SAME_SUBJECT = (
    r"(?:live|work|moved|relocated|come|love|like|enjoy|adore|hate|dislike|detest|prefer|don't|do not|am)"
)
_LEFT_OUT_I = re.compile(_SAME_SUBJECT + r"\b", re.IGNORECASE)
# Clauses of one sentence: "My name is Ada and I live in Paris" is two statements.
_CLAUSE_SPLIT = re.compile(
    r"\s*(?:,\s*)?\b(?:and|but|also|plus)\s+(?=(?:i|i'm|i am|my|call me|" + _SAME_SUBJECT + r")\b)",
    re.IGNORECASE,
)
# Values that are not things: pronouns, fillers, quantities ("I like it", "I'm a bit tired").
_NOT_A_THING = frozenset(
    "it that this these those them him her you me us one ones something nothing anything "
    "everything none bit little lot few here there so too very much more less tomorrow later "
    "back today tonight soon again sure".split()
)
_PLACE_TAIL = re.compile(r"\s*[A-Z][\w.'-]*(?:\s+[A-Z][\w.'-]*)*\s*[.!]*\s*")
_RATHER = re.compile(r"\s+(?:over|to|rather than|instead of)\s+", re.IGNORECASE)
_ARTICLES = re.compile(r"^(?:the|a|an|my|some|to)\s+", re.IGNORECASE)


class _Found(msgspec.Struct, frozen=True):
    """What one clause states: the fact to remember (if any) and the relations for the graph."""

    fact: ExtractedFact | None
    relations: tuple[ExtractedRelation, ...] = ()


_Build = Callable[[str, "re.Match[str]"], "_Found | None"]


def _thing(value: str) -> str:
    """A value as part of a key: lower case, articles dropped, single spaces."""
    words = _ARTICLES.sub("", value.strip().lower())
    return " ".join(re.findall(r"[\w'&+.-]+", words))


def _fact(key: str, text: str, kind: Literal["fact", "preference"] = "fact") -> ExtractedFact:
    return ExtractedFact(key=key, text=text, kind=kind)


def _stated(fact: ExtractedFact, predicate: str, value: str, object_type: str) -> _Found:
    """A statement about the author: its fact, and the same as the author's relation."""
    relation = ExtractedRelation(USER, predicate, value, "person", object_type, fact.key)
    return _Found(fact, (relation,))


def _person(value: str) -> str | None:
    """``value`` when it reads as a person's name (capitalised, at most four words), else None:
    "my boss is Priya Raman", not "my boss is annoying"."""
    words = value.split()
    if not words or len(words) > 4 or not words[0][:1].isupper() or words[0].lower() in _NOT_A_THING:
        return None
    return value


#: Kin and colleagues: the word, the author's predicate, and how the fact's key is made.
_KIN = {
    "wife": "married_to", "husband": "married_to", "partner": "married_to", "spouse": "married_to",
    "manager": "reports_to", "boss": "reports_to",
    "sister": "sibling_of", "brother": "sibling_of", "sibling": "sibling_of",
    "friend": "friend_of", "best friend": "friend_of",
}
_FUNCTIONAL_KIN = frozenset({"married_to", "reports_to"})  # one at a time: the key has no name in it
_KIN_WORDS = "|".join(sorted(_KIN, key=len, reverse=True))


def _kin(word: str, name: str) -> _Found:
    predicate = _KIN[word.lower()]
    key = predicate if predicate in _FUNCTIONAL_KIN else f"{predicate}:{_thing(name)}"
    fact = _fact(key, f"The user's {word.lower()} is {name}")
    return _Found(fact, (ExtractedRelation(USER, predicate, name, "person", "person", key),))


def _rules() -> list[tuple[re.Pattern[str], _Build]]:
    """The statements understood, each a pattern anchored at the clause's start and how its
    fact and relations are built from the value it captured (``v``, and ``x`` where there are
    two)."""

    def name(v: str, m: re.Match[str]) -> _Found:
        named = v.title() if v.islower() else v
        return _stated(_fact("name", f"The user's name is {named}"), NAMED, named, "person")

    def lives(v: str, m: re.Match[str]) -> _Found:
        return _stated(_fact("lives_in", f"The user lives in {v}"), "lives_in", v, "place")

    def origin(v: str, m: re.Match[str]) -> _Found:
        return _stated(_fact("from", f"The user is from {v}"), "comes_from", v, "place")

    def works(v: str, m: re.Match[str]) -> _Found:
        return _stated(_fact("works_at", f"The user works at {v}"), "works_at", v, "organization")

    def role(v: str, m: re.Match[str]) -> _Found:
        article = "an" if v[:1].lower() in "aeiou" else "a"
        return _stated(_fact("role", f"The user is {article} {v}"), "works_as", v, "role")

    def likes(v: str, m: re.Match[str]) -> _Found:
        # one key per thing for both liking and disliking it: what the user says last stands
        return _stated(_fact(f"likes:{_thing(v)}", f"The user likes {v}", "preference"), "likes", v, "thing")

    def dislikes(v: str, m: re.Match[str]) -> _Found:
        fact = _fact(f"likes:{_thing(v)}", f"The user does not like {v}", "preference")
        return _stated(fact, "dislikes", v, "thing")

    def prefers(v: str, m: re.Match[str]) -> _Found | None:
        # "X over Y" and "Y over X" share a key: the later choice stands
        parts = _RATHER.split(v, maxsplit=1)
        things = sorted(_thing(part) for part in parts)
        fact = _fact(f"prefers:{' vs '.join(things)}", f"The user prefers {v}", "preference")
        chosen = _value(parts[0])
        return _stated(fact, "prefers", chosen, "thing") if chosen else _Found(fact)

    def favourite(v: str, m: re.Match[str]) -> _Found | None:
        what = _value(m.group("x"))
        predicate = None if what is None else normal_predicate(f"favourite_{_thing(what)}")
        if what is None or predicate is None:
            return None
        fact = _fact(f"favourite:{_thing(what)}", f"The user's favourite {what} is {v}", "preference")
        return _stated(fact, predicate, v, "thing")

    def kin(v: str, m: re.Match[str]) -> _Found | None:
        named = _person(v)
        return None if named is None else _kin(m.group("k"), named)

    def kin_who(v: str, m: re.Match[str]) -> _Found | None:
        # "my sister Eve lives in Rome": who she is to the author, and the fact about her
        named = _person(m.group("n"))
        if named is None:
            return None
        found = _kin(m.group("k"), named)
        verb = m.group("verb").lower()
        predicate, object_type = (
            ("lives_in", "place") if verb.startswith("live") else
            ("works_at", "organization") if verb.startswith("work") else ("comes_from", "place")
        )
        about = ExtractedRelation(named, predicate, v, "person", object_type, None, m.group(0))
        return _Found(found.fact, (*found.relations, about))

    adverb = r"(?:(?:really|truly|also|still|currently|now|actually|absolutely|just|quite)\s+)?"
    kin_word = rf"(?:my|our) (?P<k>{_KIN_WORDS})"
    return [
        (re.compile(r"^(?:my name is|my name's|call me|i am called|i'm called)\s+(?P<v>.+)", re.I), name),
        (re.compile(rf"^i {adverb}(?:live|reside|stay) in\s+(?P<v>.+)", re.I), lives),
        (re.compile(rf"^(?:i'm|i am) {adverb}(?:living|based|residing) in\s+(?P<v>.+)", re.I), lives),
        (re.compile(r"^i (?:just |recently )?(?:moved|relocated) to\s+(?P<v>.+)", re.I), lives),
        (re.compile(r"^(?:i'm|i am|i come) (?:originally )?from\s+(?P<v>.+)", re.I), origin),
        (re.compile(rf"^i {adverb}work (?:at|for|in)\s+(?P<v>.+)", re.I), works),
        (re.compile(rf"^(?:i'm|i am) {adverb}(?:working|employed) (?:at|for|by)\s+(?P<v>.+)", re.I), works),
        (re.compile(r"^(?:i'm|i am|i work as) (?:a|an)\s+(?P<v>.+)", re.I), role),
        (re.compile(
            rf"^i {adverb}(?:don't|do not|dont|didn't|did not) (?:really )?(?:like|love|enjoy)\s+(?P<v>.+)"
            rf"|^i {adverb}(?:hate|dislike|detest|can't stand|cannot stand|can not stand)\s+(?P<v2>.+)", re.I,
        ), dislikes),
        (re.compile(rf"^i {adverb}(?:like|love|enjoy|adore)\s+(?P<v>.+)", re.I), likes),
        (re.compile(rf"^i {adverb}prefer\s+(?P<v>.+)", re.I), prefers),
        (re.compile(r"^my (?:favourite|favorite|fave) (?P<x>[\w' -]+?) (?:is|are)\s+(?P<v>.+)", re.I), favourite),
        (re.compile(rf"^{kin_word}(?:'s name)? is (?:called |named )?(?P<v>.+)", re.I), kin),
        (re.compile(
            rf"^{kin_word},? (?P<n>[^\W\d_][\w'-]*),? (?P<verb>lives in|works (?:at|for)|is from|comes from)"
            r"\s+(?P<v>.+)", re.I,
        ), kin_who),
    ]


def _value(raw: str) -> str | None:
    """The value a statement captured, cut at its end (or None when it is not a thing)."""
    value = _VALUE_END.sub("", raw.strip())
    head, comma, tail = value.partition(",")
    if comma and not _PLACE_TAIL.fullmatch(tail):  # "Paris, France" stays whole; "Paris, it's nice" not
        value = head
    value = value.strip().strip(".!;,\"'`*_ ").strip()
    if not value or len(value) > _MAX_VALUE_CHARS or len(value.split()) > _MAX_VALUE_WORDS:
        return None
    words = value.lower().split()
    if words[0] in _NOT_A_THING or words[0] in ("not", "no", "never"):
        return None
    return value


class RuleExtractor:
    """Offline, deterministic extraction of first-person statements in English.

    Understood (case-insensitive, after fillers such as "well," or "actually"; a clause may
    leave out its "I": "I live in Paris and work at Acme"): "my name is X" / "call me X"
    (``name``), "I live in X" / "I moved to X" (``lives_in``), "I'm from X" (``from``), "I work
    at/for X" (``works_at``), "I am a/an X" / "I work as a X" (``role``), "I like/love/enjoy X"
    and "I don't like / hate X" (``likes:<x>``, one key for both so the latest opinion stands),
    "I prefer X" (``prefers:<x>``), "my favourite X is Y" (``favourite:<x>``), "my
    wife/husband/partner is X" (``married_to``), "my manager/boss is X" (``reports_to``), "my
    sister/brother/friend is X" (``sibling_of:<x>``, ``friend_of:<x>``) where X is a capitalised
    name, also as "my sister Eve lives in/works at/is from Y". Questions, negated statements ("I
    don't live in Paris", "I'm not a doctor"), hypotheticals ("if I lived in ...") and requests
    ("I'd like a coffee") state nothing and give nothing. Never raises on any text.

    As a :class:`GraphExtractor`, each statement is also a relation of the author (:data:`USER`):
    ``named`` (the name: an alias of the author), ``lives_in`` and ``comes_from`` (a place),
    ``works_at`` (an organization), ``works_as`` (a role), ``likes`` / ``dislikes`` /
    ``prefers`` / ``favourite_<x>`` (a thing), ``married_to``, ``reports_to``, ``sibling_of``,
    ``friend_of`` (a person); "my sister Eve lives in Rome" adds ``Eve lives_in Rome``."""

    def __init__(self) -> None:
        self._rules = _rules()
        # the last message read: the learner asks for its facts, then for its relations
        self._last: tuple[str, list[_Found]] = ("", [])

    async def extract(self, text: str, *, user_id: str) -> list[ExtractedFact]:
        """The facts ``text`` states about its author (see the class docstring)."""
        return self.extract_now(text)

    async def extract_relations(self, text: str, *, user_id: str) -> list[ExtractedRelation]:
        """The relations ``text`` states (see the class docstring)."""
        return self.extract_relations_now(text)

    def extract_now(self, text: str) -> list[ExtractedFact]:
        """:meth:`extract`, synchronously (it does no I/O)."""
        found: dict[str, ExtractedFact] = {}  # by key: within one message the last word stands
        for clause in self._found(text):
            if clause.fact is not None:
                found.pop(clause.fact.key, None)
                found[clause.fact.key] = clause.fact
        return list(found.values())

    def extract_relations_now(self, text: str) -> list[ExtractedRelation]:
        """:meth:`extract_relations`, synchronously (it does no I/O)."""
        # as for facts, the last word stands: by the fact a relation restates, else by its triple
        found: dict[tuple[str, ...], ExtractedRelation] = {}
        for clause in self._found(text):
            for relation in clause.relations:
                key = (relation.fact_key,) if relation.fact_key else (
                    relation.subject, relation.predicate, relation.object.lower()
                )
                found.pop(key, None)
                found[key] = relation
        return list(found.values())

    def _found(self, text: str) -> list[_Found]:
        last_text, last_found = self._last
        if text == last_text:
            return last_found
        found: list[_Found] = []
        normal = text.replace("\u2019", "'").replace("\u2018", "'")
        for sentence in _SENTENCE.findall(normal):
            if "?" in sentence:
                continue  # a question states nothing
            for clause in _CLAUSE_SPLIT.split(sentence):
                stated = self._clause(clause)
                if stated is not None:
                    found.append(stated)
        self._last = (text, found)
        return found

    def _clause(self, clause: str) -> _Found | None:
        clause = _FILLER.sub("", " ".join(clause.split())).strip()
        if _LEFT_OUT_I.match(clause):
            clause = "I " + clause
        for pattern, build in self._rules:
            match = pattern.match(clause)
            if match is None:
                continue
            groups = match.groupdict()
            value = _value(groups.get("v") or groups.get("v2") or "")
            stated = None if value is None else build(value, match)
            if stated is None:
                return None
            evidence = clause.rstrip(".!;\n ")
            return _Found(stated.fact, tuple(
                r if r.evidence else msgspec.structs.replace(r, evidence=evidence) for r in stated.relations
            ))
        return None


# --------------------------------------------------------------------------- the learner


#: Errors that say the log or a host cannot be reached right now: the message is learned again
#: once it can (the follower restarts from the last message it finished). Anything else is about
#: the message itself (its session ended, a quota is full, ...): logged, and the learner goes on.
_TRANSIENT = (LogError, CommandTimeoutError, ProjectionTimeoutError, ClosedError, TimeoutError, OSError)
_OWNERS_KEPT = 10_000  # session owners cached (an owner never changes)
_FINAL_CHECKPOINT = 5.0  # seconds the checkpoint taken when the learner stops may take


_EVIDENCE_CHARS = 500  # of the message, as a relation's evidence when no fact or clause restates it
_OPPOSITES = {"likes": "dislikes", "dislikes": "likes"}


def _fact_key_of(relation: ExtractedRelation) -> str | None:
    """The key of the fact that states the same as ``relation``: its own ``fact_key``, else
    the key the rule extractor would give the author's relation (a model's relations name no
    fact)."""
    if relation.fact_key or relation.subject != USER:
        return relation.fact_key
    predicate, thing = relation.predicate, _thing(relation.object)
    if predicate in _SAME_KEY:
        return _SAME_KEY[predicate]
    if predicate in ("likes", "dislikes"):
        return f"likes:{thing}"
    if predicate in ("sibling_of", "friend_of"):
        return f"{predicate}:{thing}"
    if predicate.startswith("favourite_"):
        return "favourite:" + predicate.removeprefix("favourite_").replace("_", " ")
    return None


_SAME_KEY = {
    NAMED: "name", "lives_in": "lives_in", "comes_from": "from", "works_at": "works_at",
    "works_as": "role", "married_to": "married_to", "reports_to": "reports_to",
}


class _GraphMemory(Protocol):
    """What the learner writes the graph with (``AsyncMemory``'s knowledge-graph calls)."""

    async def relate(
        self, subject: str, predicate: str, object: str, *, session_id: str, scope: str = ...,
        subject_type: str = ..., object_type: str = ..., evidence: str | None = ...,
        metadata: dict[str, Any] | None = ..., source: str | None = ..., tenant: str | None = ...,
    ) -> Relation: ...

    async def note_entity(
        self, name: str, *, session_id: str, scope: str = ..., entity_type: str = ...,
        aliases: Sequence[str] = ..., tenant: str | None = ...,
    ) -> Entity: ...

    async def facts_about(
        self, entity: str, *, session_id: str, predicates: Sequence[str] | None = ...,
        scopes: Sequence[str] = ..., tenant: str | None = ...,
    ) -> list[Relation]: ...

    async def end_fact(
        self, relation_id: str, *, session_id: str, scope: str = ..., tenant: str | None = ...
    ) -> bool: ...


class _Position(msgspec.Struct):
    seq: int


_RESTORE_WAIT = 3.0  # seconds opening a client waits for the learner's checkpoint before going on


class Learner:
    """Follows every tenant's sessions and remembers what their users state (see the module
    docstring). ``bb.learning`` on a host; started by the client, stopped with it.

    ``memory`` writes the facts, ``owner_of(session_id, tenant)`` answers a session's user
    (None: unknown), ``checkpoints`` keeps the position (name ``"learner"``) at most every
    ``checkpoint_interval`` seconds while it moves, and when the learner stops.
    """

    name = "learner"

    def __init__(
        self,
        journal: Journal | SharedLog,
        memory: AsyncMemory,
        owner_of: Callable[[str, str], Awaitable[str | None]],
        checkpoints: Checkpoints,
        extractor: Extractor,
        *,
        principal: str = "learner",
        timeout: float = 10.0,
        checkpoint_interval: float = 1.0,
    ) -> None:
        self.extractor = extractor
        self._journal = journal
        self._memory = memory
        self._owner_of = owner_of
        self._checkpoints = checkpoints
        self._principal = principal
        self._timeout = timeout
        self._interval = checkpoint_interval
        self._filter = f"{journal.subjects.prefix}.*.session.*"
        self.seq = 0
        """The last stream sequence the learner has finished with."""
        self.learned = 0
        """Facts written since this client opened."""
        self.related = 0
        """Relations (and names) written into the graph since this client opened."""
        self._restored = False
        self._token: Any = None
        self._saved = 0
        self._moved = anyio.Event()
        self._waiters = Waiters()
        self._owners: collections.OrderedDict[tuple[str, str], str | None] = collections.OrderedDict()

    # ------------------------------------------------------------------ waiting

    async def caught_up(self, sequence: int, timeout: float | None = None) -> int:
        """Return once the learner has finished with every session commit up to ``sequence``
        (its facts written: a recall from this client finds them); returns the sequence it has
        reached. A ``sequence`` beyond the log's newest session commit counts as that one.
        ProjectionTimeoutError after ``timeout`` seconds (default: the client's command
        timeout). Event-driven: nothing polls."""
        if sequence <= self.seq:
            return self.seq
        timeout = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        target = sequence
        with anyio.move_on_after(timeout):
            target = min(sequence, await self._journal.last_seq_of(self._filter))
        left = deadline - time.monotonic()
        if left > 0 and await self._waiters.wait(target, left, lambda: self.seq):
            return self.seq
        raise ProjectionTimeoutError(
            f"the learner finished with sequence {self.seq}, not {target}, within {timeout}s; "
            "it is behind the log (lag): try again", projection=self.name, wanted=target, applied=self.seq,
        )

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Restore the position (once), then follow the log until cancelled. Run it under
        :func:`blackbird._retry.keep_running`: a failure to read the log or write a memory ends
        this call, and the next one resumes after the last message finished. Ready once the
        position is restored, or once restoring failed (a cluster still electing the checkpoint
        store's leader must not fail opening a client: the next call restores it)."""
        if not self._restored:
            try:
                with anyio.fail_after(_RESTORE_WAIT):
                    stored = await self._checkpoints.load(self.name)
            except Exception:
                task_status.started()
                raise
            if stored is not None:
                self.seq = self._saved = msgspec.json.decode(stored.data, type=_Position).seq
                self._token = stored.token
            self._restored = True
            log.info("learner_started", seq=self.seq)
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._checkpoint_when_moved)
                await self._journal.follow_with(self._filter, self.seq, self._on_entry)
        finally:
            with anyio.move_on_after(_FINAL_CHECKPOINT, shield=True):
                await self._checkpoint_quietly()

    async def _on_entry(self, entry: Entry) -> None:
        for event in entry.commit.events:
            if isinstance(event, MessagePosted) and event.channel == "chat" and event.author is not None:
                tenant = Subjects.tenant_of(entry.subject)
                session_id = entry.subject.rsplit(".", 1)[1]
                await self._learn(entry.seq, tenant, session_id, event.author, event.text)
        self.seq = entry.seq
        self._waiters.wake(self.seq)
        self._moved.set()

    async def _learn(self, seq: int, tenant: str, session_id: str, author: str, text: str) -> None:
        if await self._owner(tenant, session_id) != author:
            return  # a participant's message: not what the session's user stated
        try:
            facts = await self.extractor.extract(text, user_id=author)
        except Exception as exc:
            log.warning("learning_extract_failed", tenant=tenant, session_id=session_id, seq=seq, error=repr(exc))
            return
        graph = isinstance(self.extractor, GraphExtractor)
        if not facts and not graph:
            return
        principal = acting_principal.set(self._principal)
        try:
            # the facts first: what was said is recallable before the graph has it
            remembered = await self._remember(facts, seq, tenant, session_id)
            if isinstance(self.extractor, GraphExtractor):
                await self._relate(self.extractor, facts, remembered, seq, tenant, session_id, author, text)
        finally:
            acting_principal.reset(principal)
        log.debug("learned", tenant=tenant, session_id=session_id, seq=seq, facts=len(facts))

    async def _remember(
        self, facts: list[ExtractedFact], seq: int, tenant: str, session_id: str
    ) -> dict[str, str]:
        """Remember ``facts``; returns the memory id of each fact written, by key."""
        remembered: dict[str, str] = {}
        for fact in facts:
            try:
                memory = await self._memory.remember(
                    fact.text, session_id=session_id, scope="user", key=fact.key, kind=fact.kind,
                    tenant=tenant, metadata={"learned_from": seq},
                )
            except _TRANSIENT:
                raise
            except Exception as exc:
                log.info("learning_skipped", tenant=tenant, session_id=session_id, seq=seq,
                         key=fact.key, error=repr(exc))
            else:
                remembered[fact.key] = memory.memory_id
                self.learned += 1
        return remembered

    async def _relate(
        self, extractor: GraphExtractor, facts: list[ExtractedFact], remembered: dict[str, str],
        seq: int, tenant: str, session_id: str, author: str, text: str,
    ) -> None:
        """Write the relations ``text`` states into the graph, each pointing at the memory of
        the fact it restates. Errors: as for facts (transient ones raise, so the message is
        learned again; others are logged and the next relation goes on)."""
        try:
            relations = await extractor.extract_relations(text, user_id=author)
        except Exception as exc:
            log.warning("learning_extract_relations_failed", tenant=tenant, session_id=session_id, seq=seq,
                        error=repr(exc))
            return
        said = {fact.key: fact.text for fact in facts}
        # names first: the author's node then answers to them when the other facts are written
        for relation in sorted(relations, key=lambda r: r.predicate != NAMED):
            try:
                await self._relate_one(relation, said, remembered, seq, tenant, session_id, author, text)
            except _TRANSIENT:
                raise
            except Exception as exc:
                log.info("learning_relation_skipped", tenant=tenant, session_id=session_id, seq=seq,
                         predicate=relation.predicate, error=repr(exc))
            else:
                self.related += 1

    async def _relate_one(
        self, relation: ExtractedRelation, said: dict[str, str], remembered: dict[str, str],
        seq: int, tenant: str, session_id: str, author: str, text: str,
    ) -> None:
        graph = cast("_GraphMemory", self._memory)
        subject, subject_type = (author, "person") if relation.subject == USER else (
            relation.subject, relation.subject_type
        )
        if relation.predicate == NAMED:
            await graph.note_entity(
                subject, session_id=session_id, scope="user", entity_type=subject_type,
                aliases=(relation.object,), tenant=tenant,
            )
            return
        obj, object_type = (author, "person") if relation.object == USER else (
            relation.object, relation.object_type
        )
        key = _fact_key_of(relation)
        written = await graph.relate(
            subject, relation.predicate, obj, session_id=session_id, scope="user",
            subject_type=subject_type, object_type=object_type,
            evidence=said.get(key or "") or relation.evidence or text[:_EVIDENCE_CHARS],
            metadata={"learned_from": seq}, source=remembered.get(key or ""), tenant=tenant,
        )
        opposite = _OPPOSITES.get(relation.predicate)
        if opposite is None:
            return
        # "I don't like X" after "I like X": the old opinion ends (and the other way round)
        for old in await graph.facts_about(
            subject, session_id=session_id, predicates=[opposite], scopes=("user",), tenant=tenant
        ):
            same = old.object_id == written.object_id if old.object_id and written.object_id else (
                _thing(old.object) == _thing(obj)
            )
            if same and old.valid_to is None and old.ended_at is None:
                await graph.end_fact(old.relation_id, session_id=session_id, scope="user", tenant=tenant)

    async def _owner(self, tenant: str, session_id: str) -> str | None:
        key = (tenant, session_id)
        if key in self._owners:
            self._owners.move_to_end(key)
            return self._owners[key]
        owner = await self._owner_of(session_id, tenant)
        self._owners[key] = owner
        if len(self._owners) > _OWNERS_KEPT:
            self._owners.popitem(last=False)
        return owner

    # ------------------------------------------------------------------ checkpoints

    async def _checkpoint_when_moved(self) -> None:
        while True:
            await self._moved.wait()
            self._moved = anyio.Event()
            await self._checkpoint_quietly()
            await anyio.sleep(self._interval)  # at most one checkpoint an interval

    async def _checkpoint_quietly(self) -> None:
        """Store the position if it moved; a failure is logged (a restart then learns a few
        messages again, which the memory merges as near-duplicates)."""
        if self.seq <= self._saved:
            return
        seq = self.seq
        try:
            for _ in range(5):
                data = msgspec.json.encode(_Position(seq=seq))
                token = await self._checkpoints.save(self.name, seq, data, self._token)
                if token is not None:
                    self._token, self._saved = token, seq
                    return
                stored = await self._checkpoints.peek(self.name)  # another host stored one since
                self._token = None if stored is None else stored[1]
                if stored is not None and stored[0] >= seq:
                    self._saved = seq
                    return
        except Exception as exc:
            log.warning("learner_checkpoint_failed", seq=seq, error=repr(exc))
