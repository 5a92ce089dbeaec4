"""Learning across sessions: what users state about themselves becomes user-scope memories.

An :class:`Extractor` turns one of the user's messages into :class:`ExtractedFact` s (a key, a
standalone statement, a kind). Two ship: :class:`RuleExtractor` (offline, deterministic, English
first-person statements) and ``blackbird.agents.openai.OpenAIExtractor`` (a model's structured
JSON output).

The :class:`Learner` runs on hosts, off the reply path: it follows every tenant's session
commits in the log and, for each message its session's own user posted on the ``chat``
channel, writes the extracted facts with ``memory.remember(..., scope="user", key=...)``. The
memory service does the rest: a near-duplicate updates the memory it repeats, a newer fact
with the same key supersedes the older one (``recall(as_of=...)`` still finds it). Its
position in the log is checkpointed in the projections' checkpoint store, so a restart resumes
where it stopped instead of learning everything again.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

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

__all__ = ["ExtractedFact", "Extractor", "Learner", "RuleExtractor"]

log = structlog.get_logger("blackbird.learning")


class ExtractedFact(msgspec.Struct, frozen=True):
    """One thing a user stated about themselves, ready to remember.

    ``key`` names what it is about ("name", "lives_in", "likes:coffee", "favourite:colour"): a
    later fact with the same key supersedes the earlier one. ``text`` is a standalone statement
    ("The user's name is Ada") that reads right when recalled out of its conversation."""

    key: str
    text: str
    kind: Literal["fact", "preference"]


@runtime_checkable
class Extractor(Protocol):
    """Turns one message a user wrote into the facts and preferences it states."""

    async def extract(self, text: str, *, user_id: str) -> list[ExtractedFact]:
        """The facts ``text`` states about its author ``user_id`` (empty: none)."""
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
# Clauses of one sentence: "My name is Ada and I live in Paris" is two statements.
_CLAUSE_SPLIT = re.compile(
    r"\s*(?:,\s*)?\b(?:and|but|also|plus)\s+(?=(?:i|i'm|i am|my|call me)\b)", re.IGNORECASE
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

_Build = Callable[[str, "re.Match[str]"], "ExtractedFact | None"]


def _thing(value: str) -> str:
    """A value as part of a key: lower case, articles dropped, single spaces."""
    words = _ARTICLES.sub("", value.strip().lower())
    return " ".join(re.findall(r"[\w'&+.-]+", words))


def _fact(key: str, text: str, kind: Literal["fact", "preference"] = "fact") -> ExtractedFact:
    return ExtractedFact(key=key, text=text, kind=kind)


def _rules() -> list[tuple[re.Pattern[str], _Build]]:
    """The statements understood, each a pattern anchored at the clause's start and how its
    fact is built from the value it captured (``v``, and ``x`` where there are two)."""

    def name(v: str, m: re.Match[str]) -> ExtractedFact:
        return _fact("name", f"The user's name is {v.title() if v.islower() else v}")

    def lives(v: str, m: re.Match[str]) -> ExtractedFact:
        return _fact("lives_in", f"The user lives in {v}")

    def origin(v: str, m: re.Match[str]) -> ExtractedFact:
        return _fact("from", f"The user is from {v}")

    def works(v: str, m: re.Match[str]) -> ExtractedFact:
        return _fact("works_at", f"The user works at {v}")

    def role(v: str, m: re.Match[str]) -> ExtractedFact | None:
        article = "an" if v[:1].lower() in "aeiou" else "a"
        return _fact("role", f"The user is {article} {v}")

    def likes(v: str, m: re.Match[str]) -> ExtractedFact:
        # one key per thing for both liking and disliking it: what the user says last stands
        return _fact(f"likes:{_thing(v)}", f"The user likes {v}", "preference")

    def dislikes(v: str, m: re.Match[str]) -> ExtractedFact:
        return _fact(f"likes:{_thing(v)}", f"The user does not like {v}", "preference")

    def prefers(v: str, m: re.Match[str]) -> ExtractedFact:
        # "X over Y" and "Y over X" share a key: the later choice stands
        things = sorted(_thing(part) for part in _RATHER.split(v, maxsplit=1))
        return _fact(f"prefers:{' vs '.join(things)}", f"The user prefers {v}", "preference")

    def favourite(v: str, m: re.Match[str]) -> ExtractedFact | None:
        what = _value(m.group("x"))
        if what is None:
            return None
        return _fact(f"favourite:{_thing(what)}", f"The user's favourite {what} is {v}", "preference")

    adverb = r"(?:(?:really|truly|also|still|currently|now|actually|absolutely|just|quite)\s+)?"
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

    Understood (case-insensitive, after fillers such as "well," or "actually"): "my name is X" /
    "call me X" (``name``), "I live in X" / "I moved to X" (``lives_in``), "I'm from X"
    (``from``), "I work at/for X" (``works_at``), "I am a/an X" / "I work as a X" (``role``),
    "I like/love/enjoy X" and "I don't like / hate X" (``likes:<x>``, one key for both so the
    latest opinion stands), "I prefer X" (``prefers:<x>``), "my favourite X is Y"
    (``favourite:<x>``). Questions, negated statements ("I don't live in Paris", "I'm not a
    doctor"), hypotheticals ("if I lived in ...") and requests ("I'd like a coffee") state
    nothing and give nothing. Never raises on any text."""

    def __init__(self) -> None:
        self._rules = _rules()

    async def extract(self, text: str, *, user_id: str) -> list[ExtractedFact]:
        """The facts ``text`` states about its author (see the class docstring)."""
        return self.extract_now(text)

    def extract_now(self, text: str) -> list[ExtractedFact]:
        """:meth:`extract`, synchronously (it does no I/O)."""
        found: dict[str, ExtractedFact] = {}  # by key: within one message the last word stands
        normal = text.replace("\u2019", "'").replace("\u2018", "'")
        for sentence in _SENTENCE.findall(normal):
            if "?" in sentence:
                continue  # a question states nothing
            for clause in _CLAUSE_SPLIT.split(sentence):
                fact = self._clause(clause)
                if fact is not None:
                    found.pop(fact.key, None)
                    found[fact.key] = fact
        return list(found.values())

    def _clause(self, clause: str) -> ExtractedFact | None:
        clause = _FILLER.sub("", " ".join(clause.split())).strip()
        for pattern, build in self._rules:
            match = pattern.match(clause)
            if match is None:
                continue
            groups = match.groupdict()
            value = _value(groups.get("v") or groups.get("v2") or "")
            return None if value is None else build(value, match)
        return None


# --------------------------------------------------------------------------- the learner


#: Errors that say the log or a host cannot be reached right now: the message is learned again
#: once it can (the follower restarts from the last message it finished). Anything else is about
#: the message itself (its session ended, a quota is full, ...): logged, and the learner goes on.
_TRANSIENT = (LogError, CommandTimeoutError, ProjectionTimeoutError, ClosedError, TimeoutError, OSError)
_OWNERS_KEPT = 10_000  # session owners cached (an owner never changes)
_FINAL_CHECKPOINT = 5.0  # seconds the checkpoint taken when the learner stops may take


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
        journal: Journal,
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
        if not facts:
            return
        principal = acting_principal.set(self._principal)
        try:
            for fact in facts:
                try:
                    await self._memory.remember(
                        fact.text, session_id=session_id, scope="user", key=fact.key, kind=fact.kind,
                        tenant=tenant, metadata={"learned_from": seq},
                    )
                except _TRANSIENT:
                    raise
                except Exception as exc:
                    log.info("learning_skipped", tenant=tenant, session_id=session_id, seq=seq,
                             key=fact.key, error=repr(exc))
                else:
                    self.learned += 1
        finally:
            acting_principal.reset(principal)
        log.debug("learned", tenant=tenant, session_id=session_id, seq=seq, facts=len(facts))

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
