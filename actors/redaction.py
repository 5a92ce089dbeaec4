"""Privacy redaction of memory text before anything is written (pure).

:func:`redact` replaces e-mail addresses, payment card numbers and phone numbers with a
placeholder and counts what it replaced. It runs in three passes, in this order:

1. **e-mails** first, so digits inside an address are never mistaken for a phone number;
2. **cards**: 13-19 digits, unbroken or grouped by single spaces or dashes, kept unless they
   pass the Luhn check (an order number that fails it stays);
3. **phones**: international (``+CC ...``) or national numbers of 7-15 digits in common
   groupings (spaces, dashes, dots, parentheses).

The matchers lean towards keeping numbers that are not contact data: years, small numbers,
versions (``1.2.3``), IP addresses, times (``12:30``), dates (``2026-11-25``, ``25.11.2026``),
prices (``1,299.00``) and year ranges (``2019-2024``) are kept. A run of numbers separated by
single spaces is judged whole, so a list of small numbers is not half taken for a phone, and
a phone written right after or before another number (``555 123 4567 2``) is kept. These are
heuristics: an unusual phone format can slip through and a grouped number of 7-15 digits
(``12 345 678``) can be taken for a phone. Long inputs are scanned in linear time: the
patterns use possessive quantifiers (Python 3.11+) and never backtrack through digit runs.

Redacting twice changes nothing more, provided the replacement holds no digit and no ``@``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection

import msgspec

__all__ = ["KINDS", "RedactionPolicy", "redact"]

#: The kinds :func:`redact` counts, in the order it looks for them.
KINDS = ("email", "card", "phone")


class RedactionPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What to redact and what to put in its place.

    ``replacement`` is a template: ``{kind}`` becomes ``email``, ``phone`` or ``card``; any other
    text (braces included) is copied as is.
    """

    emails: bool = True
    phones: bool = True
    cards: bool = True
    replacement: str = "[{kind}]"

    @classmethod
    def of(cls, kinds: Collection[str]) -> RedactionPolicy:
        """Redacting just ``kinds`` ("email", "phone", "card"), as a tier's memory policy names them."""
        return cls(emails="email" in kinds, phones="phone" in kinds, cards="card" in kinds)


def redact(text: str, policy: RedactionPolicy) -> tuple[str, dict[str, int]]:
    """Return ``text`` with the enabled kinds replaced, and how many of each were replaced.

    The counts always hold the keys ``"email"``, ``"card"`` and ``"phone"`` (0 when a kind is
    disabled or absent).
    """
    counts = dict.fromkeys(KINDS, 0)
    if policy.emails:
        text = _EMAIL.sub(lambda m: _replace("email", policy, counts), text)
    if policy.cards:
        text = _DIGIT_RUN.sub(lambda m: _redact_cards(m, policy, counts), text)
    if policy.phones:
        text = _PHONE.sub(lambda m: _redact_phone(m, policy, counts), text)
    return text, counts


def _replace(kind: str, policy: RedactionPolicy, counts: dict[str, int]) -> str:
    counts[kind] += 1
    return policy.replacement.replace("{kind}", kind)


# --------------------------------------------------------------------------- e-mail

_LOCAL_CHAR = r"[\w!#$%&'*+/=?^`{|}~-]"
_EMAIL = re.compile(
    rf"""
    (?<![\w!#$%&'*+/=?^`{{|}}~.-])          # not the tail of a longer local part
    {_LOCAL_CHAR}++(?:\.{_LOCAL_CHAR}++)*+  # local part: dot-separated atoms
    @
    (?:[^\W_](?:[\w-]{{0,61}}[^\W_])?\.)+   # domain labels
    (?:[^\W\d_]{{2,63}}|xn--[a-z0-9-]{{1,59}})  # top-level domain (letters or punycode)
    (?![\w-]|\.[^\W_])                      # not cut out of a longer domain
    """,
    re.VERBOSE | re.IGNORECASE,
)


# --------------------------------------------------------------------------- cards

# A run of digit groups joined by single spaces or dashes, not glued to a word, a decimal
# point, a thousands separator or a leading '+' (that is a phone's country code). Possessive,
# with no failing lookahead, so a long run is scanned once: what follows it is checked after.
_DIGIT_RUN = re.compile(r"(?<![\w.,+])(?<!\d:)\d++(?:[ -]\d++)*+")
_GLUED_AFTER = re.compile(r"\w|[.,:]\d")
_DIGIT_GROUP = re.compile(r"\d+")
_CARD_MAX_DIGITS = 19


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_shaped(groups: list[re.Match[str]], separators: set[str]) -> bool:
    """Whether contiguous digit groups are laid out like a printed card number.

    One unbroken group, or groups with one kind of separator that open with four digits and
    continue with groups of 3-6 (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3): this keeps a phrase of
    short numbers from passing for a card one time in ten by the Luhn check alone.
    """
    if len(groups) == 1:
        return True
    return (
        len(separators) == 1
        and len(groups[0].group()) == 4
        and all(3 <= len(g.group()) <= 6 for g in groups[1:])
    )


def _redact_cards(run: re.Match[str], policy: RedactionPolicy, counts: dict[str, int]) -> str:
    text = run.group(0)
    groups = list(_DIGIT_GROUP.finditer(text))
    if _GLUED_AFTER.match(run.string, run.end()):
        groups.pop()  # its last group runs on into a word or a decimal: not a card's
    out: list[str] = []
    kept_until = 0
    i = 0
    while i < len(groups):
        end = _card_at(text, groups, i)
        if end is None:
            i += 1
            continue
        out.append(text[kept_until : groups[i].start()])
        out.append(_replace("card", policy, counts))
        kept_until = groups[end - 1].end()
        i = end
    out.append(text[kept_until:])
    return "".join(out)


def _card_at(text: str, groups: list[re.Match[str]], i: int) -> int | None:
    """The end of the longest card-shaped window of groups starting at ``i`` that passes Luhn."""
    ends = []
    digits = 0
    for j in range(i, len(groups)):
        digits += len(groups[j].group())
        if digits > _CARD_MAX_DIGITS:
            break
        if digits >= 13:
            ends.append(j + 1)
    for end in reversed(ends):
        window = groups[i:end]
        seps = {text[a.end() : b.start()] for a, b in itertools.pairwise(window)}
        if _card_shaped(window, seps) and _luhn_ok("".join(g.group() for g in window)):
            return end
    return None


# --------------------------------------------------------------------------- phones

# Digit groups are possessive and group counts bounded, so a failed match gives up at once
# instead of trying every way to split a long run of digits.
_PHONE = re.compile(
    r"""
    (?<![\w+.,/@#-])(?<!\d[:\ ])           # not inside a word, number, time, path or id,
    (?:                                    # nor after a number: runs are taken whole or not
        \+\d{1,3}+(?:[ .-]\d{1,8}+){1,6}   # international: +44 20 7946 0958, +1.555.123.4567
      |
        \+\d{7,15}+                        # international, unbroken: +14155552671
      |
        (?:\+\d{1,3}+[ .-]?)?              # with an area code in parentheses:
        \(\d{1,5}+\)[ .-]?\d{2,8}+         #   +44 (0)20 7946 0958, (555) 123-4567
        (?:[ .-]\d{2,8}+){0,5}
      |
        \d{2,5}+(?:[ .-]\d{2,8}+){1,6}     # national groups: 555-123-4567, 030-1234567
      |
        0\d{8,10}+                         # unbroken with a trunk prefix: 07946095812
      |
        [2-9]\d{2}[2-9]\d{6}               # unbroken North American: 4155552671
    )
    (?!\w|[.,:/\ -]?\d)                    # all of a number: not a part of a longer one
    """,
    re.VERBOSE,
)
_DATE_OR_ADDRESS = re.compile(
    r"""
    \d{4}-\d{1,2}-\d{1,2}(?![\d-])              # ISO date, maybe followed by a time
    | \d{1,2}([.-])\d{1,2}\1\d{4}(?![\d.-])     # 25.11.2026, 25-11-2026
    | (?:\d{1,3}\.){3}\d{1,3}$                  # IPv4 address
    """,
    re.VERBOSE,
)


def _redact_phone(m: re.Match[str], policy: RedactionPolicy, counts: dict[str, int]) -> str:
    text = m.group(0)
    groups = _DIGIT_GROUP.findall(text)
    if not 7 <= sum(map(len, groups)) <= 15 or _other_number(text, groups):
        return text
    return _replace("phone", policy, counts)


def _other_number(text: str, groups: list[str]) -> bool:
    """Whether a phone-shaped match is a date, an IP address, years or a build number."""
    if text.startswith("+"):
        return False
    if _DATE_OR_ADDRESS.match(text):
        return True
    if all(len(g) == 4 and g[:2] in ("19", "20") for g in groups):
        return True  # 2019-2024, "2024 2025 2026"
    # Dotted groups with one of 5 digits are a build number (10.0.19041), not a phone.
    return "." in text and any(len(g) >= 5 for g in groups)
