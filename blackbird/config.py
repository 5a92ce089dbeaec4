"""Settings: one frozen Struct built from defaults < environment < arguments, passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import msgspec

from blackbird.errors import ValidationError, field_of

ENV_PREFIX = "BLACKBIRD_"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything configurable, with defaults. Build it with :func:`build_settings`."""

    data_dir: str | None = None  # None + no nats_url: a temporary folder (development mode)
    nats_url: str | None = None  # None: start the embedded nats-server for data_dir
    tenant: str = "default"  # the tenant used when a call does not name one
    principal: str = "sdk"  # recorded in every commit this client causes
    stream: str = "BLACKBIRD"
    subject_prefix: str = "bb"
    snapshot_bucket: str = "bb_snapshots"
    replicas: int = 1
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
    detect_abuse: bool = True  # hosts run the abuse detector and raise its alerts
    abuse: dict[str, Any] = {}  # thresholds: see projections.abuse.AbuseConfig
    log_level: str | None = None  # when Blackbird configures structlog: debug, info, warning, ...
    http_tokens: str | None = None  # `blackbird serve --http`: JSON {"<token>": "<tenant>"}


def _from_env() -> dict[str, Any]:
    fields = {f.name: f.type for f in msgspec.structs.fields(Settings)}
    found: dict[str, Any] = {}
    for name in fields:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
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
    for name in ("data_dir", "policy_file", "memory_dir"):
        if isinstance(merged.get(name), Path):
            merged[name] = str(merged[name])
    try:
        # strict=False lets environment strings like "30" or "true" convert to their field types
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        field = field_of(exc, "settings")
        raise ValidationError(
            f"{field}: {exc}", field=field, expected="see blackbird.config.Settings"
        ) from None
