"""The limits every command is held to, declared once, and the checks msgspec cannot express.

Every entry point reaches the same checks: the SDK (before it sends, and again on the host),
raw NATS requests (decoded on the host) and HTTP. The numbers below are the one table: the
command Structs of :mod:`actors.events` build their msgspec ``Meta`` constraints (lengths,
ranges, patterns) from them, the SDK's argument checks read them, README's "Limits" table shows
them. :func:`validate` adds what ``Meta`` cannot say -- valid Unicode, finite floats, integers
a JSON reader gets exactly (and msgpack snapshots can hold), the size and depth of free-form
documents such as metadata -- and then passes the command through the same JSON decoding a raw
request gets, so a command built in process meets every ``Meta`` constraint too.

Documents are walked with an explicit stack, never recursively: one nested 100,000 deep is
refused like one nested 9 deep, not with a ``RecursionError``.

Pure: no I/O, no clock. A broken rule raises :class:`Invalid`; the edges turn it into a
``ValidationError`` (or ``PayloadTooLargeError``) naming the field.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any, NamedTuple, TypeVar

import msgspec

# --------------------------------------------------------------------------- the table

#: tenant, session, user, agent and command ids, channel names: one subject token each
MAX_ID_LENGTH = 128
#: operation, tier, reason, kind, key, lease, reservation and memory ids
MAX_NAME_LENGTH = 256
#: characters of a channel message
MAX_MESSAGE_LENGTH = 65_536
#: characters of one memory's text, or of a recall query
MAX_MEMORY_TEXT = 16_384
#: metadata (of a session, a usage record, a message, a memory) encoded as JSON
MAX_METADATA_BYTES = 16 * 1024
#: a tenant's policy overrides encoded as JSON
MAX_POLICY_BYTES = 64 * 1024
#: a cache value encoded as JSON
MAX_CACHE_VALUE_BYTES = 64 * 1024
#: nested objects and lists in any document (metadata, overrides, cache value); the document
#: itself is level 1
MAX_DEPTH = 8
#: |n| of any integer, anywhere: every JSON reader gets it exactly, and msgpack (snapshots) can
#: hold it
MAX_SAFE_INT = 2**53
#: a quota amount or limit
MAX_AMOUNT = 1e15
#: seconds: leases, holds, time to live
MAX_DURATION = 366 * 86400.0
#: seconds since the epoch: 9999-12-31T23:59:59Z
MAX_INSTANT = 253_402_300_799.0

#: one subject token: printable, no '.', '*', '>' or whitespace, no lone surrogate (``\Z``, not
#: ``$``, which would let a final newline through)
TOKEN_PATTERN = r"^(?:(?![.*>\s])[\x21-\x7e\u00a0-\ud7ff\ue000-\U0010ffff])+\Z"
TOKEN = re.compile(TOKEN_PATTERN)
#: an API key's id: 16 lowercase hex characters (8 random bytes)
API_KEY_ID_PATTERN = r"^[0-9a-f]{16}\Z"
#: an API key's secret as stored: its SHA-256, 64 lowercase hex characters
SECRET_HASH_PATTERN = r"^[0-9a-f]{64}\Z"
#: a knowledge-graph predicate or entity type: lower snake_case ("lives_in", "person")
PREDICATE_PATTERN = r"^[a-z][a-z0-9_]{0,63}\Z"
PREDICATE_EXPECTED = "lower snake_case: a letter, then up to 63 letters, digits or '_'"
TOKEN_EXPECTED = (
    f"a non-empty string of at most {MAX_ID_LENGTH} characters without '.', '*', '>' or whitespace"
)


class DocumentLimit(NamedTuple):
    """How large (bytes as JSON; None: bounded by its type) and deep a document may be."""

    max_bytes: int | None
    max_depth: int


METADATA = DocumentLimit(MAX_METADATA_BYTES, MAX_DEPTH)
POLICY = DocumentLimit(MAX_POLICY_BYTES, MAX_DEPTH)
CACHE_VALUE = DocumentLimit(MAX_CACHE_VALUE_BYTES, MAX_DEPTH)
_TYPED = DocumentLimit(None, MAX_DEPTH)  # costs, id lists: their declared types bound them

#: the free-form document fields of commands, by field name
DOCUMENTS = {"metadata": METADATA, "overrides": POLICY}

DOCUMENT_EXPECTED = (
    "JSON data: objects with string keys, lists, strings, finite numbers, integers within "
    "+/-2**53, booleans and null"
)


class Invalid(ValueError):
    """A command or argument broke a rule: ``field`` (a top-level name), what was ``expected``
    and what came (``got``; None when not worth repeating). ``too_large`` for a size limit."""

    def __init__(self, field: str, expected: str, got: Any = None, *, too_large: bool = False) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        self.too_large = too_large
        super().__init__(f"{field}: expected {expected}" + ("" if got is None else f", got {got}"))

    @property
    def code(self) -> str:
        """The wire code of the error it stands for."""
        return "payload_too_large" if self.too_large else "validation_error"

    @property
    def message(self) -> str:
        return str(self)


# --------------------------------------------------------------------------- scalars


def check_str(value: str, field: str, where: str | None = None) -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate cannot be encoded)."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        at = "" if where is None or where == field else f" at {where}"
        raise Invalid(field, "valid Unicode text (no lone surrogates)",
                      f"{value[exc.start]!r} at character {exc.start}{at}") from None


def check_float(value: float, field: str, where: str | None = None) -> None:
    if not math.isfinite(value):
        at = "" if where is None or where == field else f" at {where}"
        raise Invalid(field, "a finite number", f"{value!r}{at}")


def check_int(value: int, field: str, where: str | None = None) -> None:
    if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        at = "" if where is None or where == field else f" at {where}"
        shown = str(value) if value.bit_length() < 200 else f"an integer of {value.bit_length()} bits"
        raise Invalid(field, "an integer within +/-2**53", f"{shown}{at}")


# --------------------------------------------------------------------------- documents


def _where(field: str, path: tuple[Any, ...] | None) -> str:
    """``field`` plus the keys and indexes of ``path`` (a linked list, built only on error)."""
    parts: list[str] = []
    while path is not None:
        path, step = path
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return field + "".join(reversed(parts))


def check_document(value: Any, field: str, limit: DocumentLimit = METADATA) -> None:
    """Refuse a document that is not plain JSON data within ``limit``: objects with string
    keys, lists (tuples too), valid Unicode strings, finite floats, integers within +/-2**53,
    booleans, null; at most ``limit.max_depth`` levels; at most ``limit.max_bytes`` as JSON."""
    max_bytes, max_depth = limit
    # bounds of the encoded size: the floor refuses a huge document early, the ceiling spares
    # encoding a small one to measure it (a string's character takes 1 to 6 bytes, "\uXXXX")
    floor = ceiling = 0
    stack: list[tuple[Any, int, tuple[Any, ...] | None]] = [(value, 1, None)]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                check_str(item, field, _where(field, path))
            floor += len(item) + 2
            ceiling += 6 * len(item) + 3
        elif item is None or isinstance(item, bool):
            floor += 4
            ceiling += 6
        elif isinstance(item, int):
            if not -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                check_int(item, field, _where(field, path))
            floor += 1
            ceiling += 18
        elif isinstance(item, float):
            if not math.isfinite(item):
                check_float(item, field, _where(field, path))
            floor += 1
            ceiling += 25
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                raise Invalid(field, f"at most {max_depth} levels of nesting",
                              f"more at {_where(field, path)}")
            floor += 2
            ceiling += 3
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise Invalid(field, DOCUMENT_EXPECTED,
                                      f"a {type(key).__name__} key at {_where(field, path)}")
                    if not key.isascii():
                        check_str(key, field, _where(field, path))
                    floor += len(key) + 3
                    ceiling += 6 * len(key) + 3
                    stack.append((child, depth + 1, (path, key)))
            else:
                stack.extend((child, depth + 1, (path, i)) for i, child in enumerate(item))
        else:
            raise Invalid(field, DOCUMENT_EXPECTED, f"{type(item).__name__} at {_where(field, path)}")
        if max_bytes is not None and floor > max_bytes:
            raise Invalid(field, f"at most {max_bytes} bytes as JSON", f"more than {max_bytes}", too_large=True)
    if max_bytes is not None and ceiling > max_bytes:
        size = len(_encode(value))
        if size > max_bytes:
            raise Invalid(field, f"at most {max_bytes} bytes as JSON", f"{size} bytes", too_large=True)


# --------------------------------------------------------------------------- commands

C = TypeVar("C", bound=msgspec.Struct)

_encode = msgspec.json.Encoder().encode
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_AT = re.compile(r"`\$\.([^`\[]+)")
_NAMED = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")


def _check_field(value: Any, field: str) -> None:
    # exact types first: this runs for every field of every command a host receives
    kind = type(value)
    if kind is str:
        if not value.isascii():
            check_str(value, field)
    elif value is None or kind is bool or kind is bytes:
        pass
    elif kind is float:
        if not math.isfinite(value):
            check_float(value, field)
    elif kind is int:
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            check_int(value, field)
    elif kind is dict or kind is list or kind is tuple:
        limit = DOCUMENTS.get(field)
        if limit is not None:
            if value:
                check_document(value, field, limit)
        else:  # a typed container (costs, id lists): flat, its items' types are declared
            for item in (*value.keys(), *value.values()) if kind is dict else value:
                if type(item) in (dict, list, tuple):
                    check_document(item, field, _TYPED)
                else:
                    _check_field(item, field)
    elif isinstance(value, enum.Enum):
        pass  # a member of the field's enum, or not: the decoding below tells
    elif isinstance(value, msgspec.Struct):  # a nested command part (a mention of an entity)
        for name in type(value).__struct_fields__:
            _check_field(getattr(value, name), f"{field}.{name}" if field else name)
    elif isinstance(value, str | float | int | dict | list | tuple):  # subclasses
        _check_field(kind.__mro__[kind.__mro__.index(object) - 1](value), field)
    else:
        raise Invalid(field, "a value of the field's declared type", kind.__name__)


def field_of_error(exc: msgspec.ValidationError, prefix: str = "") -> str | None:
    """The top-level field a msgspec validation error names (``$.costs[...]`` -> ``costs``);
    with ``prefix`` (``"command"``: the error is about a request whose command is under that
    key) the field of the command, ``"command"`` for the command as a whole. None if it names
    none."""
    text = str(exc)
    found = _AT.search(text)
    parts = found.group(1).split(".") if found else []
    named = _NAMED.search(text)
    if named:
        parts.append(named.group(1))
    if prefix and parts[:1] == [prefix]:
        parts = parts[1:2]
        if not parts or parts == ["type"]:  # the command itself: a missing or unknown tag
            return prefix
    return parts[0] if parts else None


def _enum_of(classes: tuple[type[Any], ...], field: str) -> type[enum.Enum] | None:
    """The enum type of ``field`` in the first of ``classes`` that declares it, if any."""
    for cls in classes:
        struct = msgspec.inspect.type_info(cls)
        if not isinstance(struct, msgspec.inspect.StructType):
            continue
        for info in struct.fields:
            if info.name != field:
                continue
            stack = [info.type]
            while stack:
                t = stack.pop()
                if isinstance(t, msgspec.inspect.EnumType):
                    return t.cls
                stack.extend(getattr(t, "types", ()))
                stack.extend(getattr(t, name) for name in ("type", "key_type", "item_type") if hasattr(t, name))
    return None


def invalid_from(
    exc: msgspec.ValidationError, classes: tuple[type[Any], ...], prefix: str = "", default: str = "command"
) -> Invalid:
    """:class:`Invalid` for a msgspec validation error (``Expected `bool`, got `str` - at
    `$.rate```) about one of ``classes`` (under ``prefix`` in a request)."""
    text = str(exc)
    field = field_of_error(exc, prefix) or default
    expected, got = text.split(" - at ", 1)[0].replace("`", ""), None
    if expected.startswith("Expected "):
        expected = expected[len("Expected "):]
    if "matching regex" in expected and "(?![.*>" in expected:  # TOKEN_PATTERN, as msgspec shows it
        expected = TOKEN_EXPECTED
    elif "matching regex" in expected and "[a-z0-9_]{0,63}" in expected:  # PREDICATE_PATTERN
        expected = PREDICATE_EXPECTED
    elif "matching regex" in expected and "[0-9a-f]{16}" in expected:  # API_KEY_ID_PATTERN
        expected = "an API key id: 16 lowercase hex characters"
    elif "matching regex" in expected and "[0-9a-f]{64}" in expected:  # SECRET_HASH_PATTERN
        expected = "a SHA-256 as 64 lowercase hex characters"
    if expected.startswith("Invalid enum value "):
        got = expected[len("Invalid enum value "):]
        kind = _enum_of(classes, field)
        expected = "a known value" if kind is None else "one of " + ", ".join(str(m.value) for m in kind)
    return Invalid(field, expected, got)


def validate(command: C) -> C:
    """``command`` as a host may decide it, or :class:`Invalid` naming the first field that
    breaks a rule.

    Checks every field for what ``Meta`` cannot express (valid Unicode, finite floats,
    integers within +/-2**53, documents within :data:`DOCUMENTS`' limits), then sends the
    command through the JSON decoding a raw request gets, so the declared types and ``Meta``
    constraints hold for a command built in process too (msgspec does not re-check a Struct
    instance). Returns the decoded command: equal to ``command`` when it was valid, with enum
    values as enum members.
    """
    cls = type(command)
    for name in cls.__struct_fields__:
        _check_field(getattr(command, name), name)
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        decoded: C = decoder.decode(_encode(command))
    except msgspec.ValidationError as exc:
        raise invalid_from(exc, (cls,)) from None
    return decoded
