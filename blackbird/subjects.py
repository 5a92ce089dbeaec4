"""Subject layout and token validation.

Events:   ``<prefix>.<tenant>.session.<session_id>``, ``<prefix>.<tenant>.user.<user_id>``,
          ``<prefix>.<tenant>.tenant``, ``<prefix>.<tenant>.memory.<scope>:<owner>``
Commands: ``<prefix>cmd.<tenant>.<session_id>`` (request/reply, served by queue-grouped hosts)
Reads:    ``<prefix>svc.<tenant>.log`` (a tenant's log, for clients without JetStream) and
          ``<prefix>svc.<tenant>.session.<session_id>`` (a session's state): request/reply, the
          subjects read-only credentials may use

Tenant isolation, per-session replay and live subscription are subject filters, so a tenant or
id that could change a subject's shape (``.``, ``*``, ``>``, whitespace) is refused up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.ports import AggregateKey
from actors.validation import MAX_ID_LENGTH, TOKEN, TOKEN_EXPECTED
from blackbird.errors import ValidationError

MAX_TOKEN_LENGTH = MAX_ID_LENGTH


def validate_token(value: Any, field: str) -> str:
    """Return ``value`` if it is usable as one subject token, else raise ValidationError naming ``field``.

    The rule is the one the host holds raw commands to (:data:`actors.validation.TOKEN_PATTERN`):
    printable, no '.', '*', '>' or whitespace, no lone surrogate, at most 128 characters."""
    if not isinstance(value, str):
        raise ValidationError(
            f"{field}: expected {TOKEN_EXPECTED}, got {type(value).__name__}",
            field=field,
            expected=TOKEN_EXPECTED,
            got=type(value).__name__,
        )
    if len(value) > MAX_ID_LENGTH or not TOKEN.match(value):
        shown = value if len(value) <= 40 else value[:37] + "..."
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate, shown
        raise ValidationError(
            f"{field}: expected {TOKEN_EXPECTED}, got {shown!r}", field=field, expected=TOKEN_EXPECTED, got=shown
        )
    return value


class Subjects:
    """Builds subjects under one prefix (``bb`` by default)."""

    def __init__(self, prefix: str = "bb") -> None:
        self.prefix = validate_token(prefix, "subject_prefix")
        self.command_prefix = f"{prefix}cmd"
        self.service_prefix = f"{prefix}svc"

    @property
    def stream_subjects(self) -> list[str]:
        p = self.prefix
        return [f"{p}.*.session.*", f"{p}.*.user.*", f"{p}.*.tenant", f"{p}.*.memory.*"]

    def aggregate(self, key: AggregateKey) -> str:
        if key.kind == "tenant":
            return f"{self.prefix}.{key.tenant}.tenant"
        return f"{self.prefix}.{key.tenant}.{key.kind}.{key.id}"

    def session(self, tenant: str, session_id: str) -> str:
        return f"{self.prefix}.{tenant}.session.{session_id}"

    @property
    def tenants_filter(self) -> str:
        """Every tenant aggregate (policies, user adjustments), for the hosts' policy book."""
        return f"{self.prefix}.*.tenant"

    @staticmethod
    def tenant_of(subject: str) -> str:
        """The tenant token of an event subject."""
        return subject.split(".", 2)[1]

    def tenant_filter(self, tenant: str) -> str:
        """Everything one tenant owns, and nothing else."""
        return f"{self.prefix}.{tenant}.>"

    def command(self, tenant: str, session_id: str) -> str:
        return f"{self.command_prefix}.{tenant}.{session_id}"

    @property
    def command_wildcard(self) -> str:
        return f"{self.command_prefix}.*.*"

    def query(self, tenant: str, session_id: str) -> str:
        """Where a session's state is asked for (a read: no command subject needed)."""
        return f"{self.service_prefix}.{tenant}.session.{session_id}"

    @property
    def query_wildcard(self) -> str:
        return f"{self.service_prefix}.*.session.*"

    def parse_command(self, subject: str) -> tuple[str, str]:
        """(tenant, session_id) from a command (or query) subject; raises ValidationError if malformed."""
        parts = subject.split(".")
        if len(parts) == 4 and parts[0] == self.service_prefix and parts[2] == "session":
            return validate_token(parts[1], "tenant"), validate_token(parts[3], "session_id")
        if len(parts) != 3 or parts[0] != self.command_prefix:
            raise ValidationError(
                f"subject: expected {self.command_prefix}.<tenant>.<session_id>, got {subject!r}",
                field="subject",
                expected=f"{self.command_prefix}.<tenant>.<session_id>",
                got=subject,
            )
        return validate_token(parts[1], "tenant"), validate_token(parts[2], "session_id")


def matcher(subject_filter: str) -> Callable[[str], bool]:
    """Whether a subject matches ``subject_filter`` as NATS matches it (``*``: one token, a final
    ``>``: one or more)."""
    want = subject_filter.split(".")
    if want[-1] == ">":
        head = want[:-1]

        def matches_tail(subject: str) -> bool:
            got = subject.split(".")
            return len(got) > len(head) and all(w in ("*", g) for w, g in zip(head, got, strict=False))

        return matches_tail

    def matches(subject: str) -> bool:
        got = subject.split(".")
        return len(got) == len(want) and all(w in ("*", g) for w, g in zip(want, got, strict=True))

    return matches
