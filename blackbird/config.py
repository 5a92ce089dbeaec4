"""Settings: one frozen Struct built from defaults < environment < arguments, passed down."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec

from blackbird.errors import ValidationError, field_of

ENV_PREFIX = "BLACKBIRD_"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything configurable, with defaults. Build it with :func:`build_settings`."""

    data_dir: str | None = None  # None + no nats_url: a temporary folder (development mode)
    # None: start the embedded nats-server for data_dir. Several servers (a cluster): their URLs
    # comma-separated, as NATS tools take them (a list given to build_settings is joined so).
    nats_url: str | None = None
    tenant: str = "default"  # the tenant used when a call does not name one
    principal: str = "sdk"  # recorded in every commit this client causes
    stream: str = "BLACKBIRD"
    subject_prefix: str = "bb"
    snapshot_bucket: str = "bb_snapshots"
    replicas: int = 1  # of the stream and buckets this client creates (never of existing ones)
    duplicate_window: float = 120.0  # seconds JetStream remembers Nats-Msg-Id
    max_payload: int = 256 * 1024  # bytes of one encoded commit
    snapshot_every: int = 500
    passivate_after: float = 300.0
    max_retries: int = 8  # append conflicts retried at least this often, and for command_timeout / 2 s
    command_timeout: float = 10.0
    serve_commands: bool = False  # also answer commands on NATS request/reply
    queue_group: str = "blackbird-hosts"
    policy_file: str | None = None  # TOML overriding the packaged tier policy
    usage_history_limit: int = 10_000  # usage records kept per user in the read model
    analytics_k: int = 5  # cross-tenant aggregates leave out tenants with fewer users
    memory_dir: str | None = None  # the LanceDB memory index (default: <data_dir>/memory)
    # memories of recently used scopes kept in memory for recall (~1.5 KB each plus the text)
    memory_cache_rows: Annotated[int, msgspec.Meta(ge=0)] = 200_000
    # knowledge-graph predicates with one value at a time: stating a new object ends the current
    # fact's validity (kept for as_of/valid_at queries). "<prefix>*" matches every predicate so starting.
    functional_predicates: tuple[str, ...] = (
        "lives_in", "works_at", "comes_from", "born_in", "works_as", "married_to", "reports_to", "favourite_*",
    )
    detect_abuse: bool = True  # hosts run the abuse detector and raise its alerts
    abuse: dict[str, Any] = {}  # thresholds: see projections.abuse.AbuseConfig
    learn: bool = True  # hosts learn users' stated facts into user-scope memories (blackbird.agents.learning)
    log_level: str | None = None  # when Blackbird configures structlog: debug, info, warning, ...
    # operator-mode (JWT) NATS: tenant accounts' public keys -> tenant, for the hosts to know
    # whose requests arrive through the shared service imports (the embedded server needs none)
    tenant_accounts: dict[str, str] = {}
    http_tokens: str | None = None  # `blackbird serve --http`: JSON {"<token>": "<tenant>"}
    # The master key wrapping the users' data keys in bb_keys (blackbird.memory.master_key):
    # base64 of 32 bytes (several comma-separated, the first current), or a file of such lines.
    # Neither: <data_dir>/keys/master.key, generated; a client on an external nats_url needs one.
    master_key: str | None = None  # secret
    master_key_file: str | None = None
    # Authentication to NATS (at most one kind; see blackbird.connection.connect_options):
    nats_creds: str | None = None  # a .creds file: the user's JWT and nkey seed (operator mode)
    nats_nkey_seed: str | None = None  # a file holding a user nkey seed (SU...)
    nats_token: str | None = None  # secret: shown as *** by repr
    nats_user: str | None = None  # with nats_password
    nats_password: str | None = None  # secret: shown as *** by repr
    # TLS: the CA bundle that signed the server's certificate; a client certificate and its key
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # The OpenAI-compatible chat-completions agent and extractor (blackbird.agents.openai); no
    # agent_base_url: none is configured (e.g. "https://api.openai.com/v1", "http://localhost:11434/v1")
    agent_base_url: str | None = None
    agent_model: str = "gpt-4o-mini"
    agent_api_key: str | None = None  # secret: shown as *** by repr
    agent_max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 512  # at most this many reply tokens a call
    agent_timeout: Annotated[float, msgspec.Meta(gt=0)] = 60.0  # seconds of silence from the model API

    def __repr__(self) -> str:
        """The fields as msgspec shows them, with the secrets (``nats_token``, ``nats_password``,
        ``http_tokens``, ``master_key``, ``agent_api_key``, credentials in ``nats_url``) replaced
        by ``***``: settings may be logged."""
        shown = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in _SECRET_FIELDS and value is not None:
                value = "***"
            elif name == "nats_url" and value is not None:
                value = ",".join(redact_url(u) for u in value.split(","))
            shown.append(f"{name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def nats_servers(self) -> list[str]:
        """The NATS server URLs of ``nats_url`` (empty when it is None)."""
        return [] if self.nats_url is None else self.nats_url.split(",")


_SECRET_FIELDS = frozenset({"nats_token", "nats_password", "http_tokens", "master_key", "agent_api_key"})
_PATH_SETTINGS = ("nats_creds", "nats_nkey_seed", "tls_ca", "tls_cert", "tls_key")


def _from_env() -> dict[str, Any]:
    fields = {f.name: f.type for f in msgspec.structs.fields(Settings)}
    found: dict[str, Any] = {}
    for name in fields:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if fields[name] is dict or getattr(fields[name], "__origin__", None) is dict:  # a JSON object
            try:
                found[name] = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                raise ValidationError(
                    f"{name}: {ENV_PREFIX + name.upper()} is not a JSON object", field=name,
                    expected="a JSON object", got=raw[:80],
                ) from None
        else:
            found[name] = raw
    return found


def build_settings(**overrides: Any) -> Settings:
    """Defaults < ``BLACKBIRD_*`` environment variables < keyword arguments (None = not given).

    Raises :class:`~blackbird.errors.ValidationError` naming the setting that is wrong.
    """
    unknown = set(overrides) - {f.name for f in msgspec.structs.fields(Settings)}
    if unknown:
        name = min(unknown)
        raise ValidationError(
            f"{name}: unknown setting", field=name, expected="a Settings field", got=name
        )
    merged: dict[str, Any] = _from_env()
    merged.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("data_dir", "policy_file", "memory_dir", "master_key_file", *_PATH_SETTINGS):
        if isinstance(merged.get(name), Path):
            merged[name] = str(merged[name])
    if merged.get("nats_url") is not None:
        merged["nats_url"] = ",".join(nats_servers(merged["nats_url"]))
    try:
        # strict=False lets environment strings like "30" or "true" convert to their field types
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        field = field_of(exc, "settings")
        raise ValidationError(
            f"{field}: {exc}", field=field, expected="see blackbird.config.Settings"
        ) from None


_URL_EXPECTED = (
    "a NATS server URL (nats://host:4222, tls://..., ws://..., or host:port), several of them "
    "comma-separated, or a list of them"
)
_SCHEMES = ("nats", "tls", "ws", "wss")


def nats_servers(value: Any) -> list[str]:
    """The server URLs of a ``nats_url`` setting: one URL, several comma-separated (as NATS
    tools take them), or a list of URLs. Each is checked as nats-py will read it (scheme
    nats/tls/ws/wss or none, a host, a port from 1 to 65535; websocket and plain URLs not
    mixed); raises ValidationError naming ``nats_url`` and the item at fault."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray) and value:
        items = list(value)
    else:
        raise _bad_url(f"got {type(value).__name__} {value!r:.80}", value)
    urls = []
    for item in items:
        if not isinstance(item, str):
            raise _bad_url(f"got {type(item).__name__} {item!r:.80} in the list", item)
        url = item.strip()
        if not url:
            raise _bad_url(f"got an empty URL in {value!r:.120}", value)
        urls.append(_checked_url(url))
    if len({u.split("://", 1)[0] in ("ws", "wss") for u in urls}) > 1:
        raise _bad_url("got websocket (ws, wss) and plain (nats, tls) URLs mixed: nats-py takes one kind", value)
    return urls


def _checked_url(url: str) -> str:
    full = url if "://" in url else f"nats://{url}"
    try:
        parts = urlsplit(full)
        port = parts.port
    except ValueError as exc:
        raise _bad_url(f"got {redact_url(url)!r} ({exc})", redact_url(url)) from None
    if parts.scheme not in _SCHEMES:
        raise _bad_url(f"got {redact_url(url)!r}: unknown scheme {parts.scheme!r}", redact_url(url))
    if not parts.hostname:
        raise _bad_url(f"got {redact_url(url)!r}: no host", redact_url(url))
    if port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _bad_url(f"got {redact_url(url)!r}: expected scheme://host:port and nothing after", redact_url(url))
    return url


def redact_url(url: str) -> str:
    """``url`` with any user name, password or token replaced by ``***`` (for logs and errors)."""
    scheme, sep, rest = url.rpartition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


def _bad_url(problem: str, got: Any) -> ValidationError:
    return ValidationError(f"nats_url: expected {_URL_EXPECTED}; {problem}", field="nats_url",
                           expected=_URL_EXPECTED, got=got)
