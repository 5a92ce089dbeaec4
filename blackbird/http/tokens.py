"""Stream tokens: short-lived, read-only, one session, signed by the server.

A browser's ``EventSource`` cannot send an ``Authorization`` header, and a page should not hold a
key that reads every session of a tenant. ``POST /v1/sessions/{id}/stream-token`` (with an API
key that may read the session) returns a token for ``GET /v1/sessions/{id}/events?token=...``.

Layout: ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))`` with payload the JSON
``{"t": tenant, "s": session_id, "e": expires_at}``. The secret is derived (HKDF-SHA256) from the
deployment's master key, so every host of a deployment accepts a token any of them issued, and a
token outlives a restart of ``serve`` until it expires. A tampered, expired or foreign token is
refused (401).
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Callable
from hashlib import sha256
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["DEFAULT_TTL", "StreamTokens"]

DEFAULT_TTL = 600.0  # seconds a stream token lives
MAX_TTL = 86_400.0
_INFO = b"blackbird stream tokens v1"


class _Payload(msgspec.Struct, frozen=True):
    t: str
    s: str
    e: float


class StreamTokens:
    """Issues and checks stream tokens under one secret."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock
        self._decode = msgspec.json.Decoder(_Payload).decode

    @classmethod
    def for_client(cls, bb: Any) -> StreamTokens:
        """Tokens under a secret derived from ``bb``'s master key (a random one if it has none:
        tokens then die with the process)."""
        from blackbird.memory.master_key import load_master_keys

        ring = load_master_keys(bb.settings, getattr(bb, "data_dir", None), required=False)
        master = ring.current.secret if ring is not None else None
        if master is None:
            import os

            master = os.urandom(32)
        secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(master)
        return cls(secret, clock=getattr(bb, "_clock", time.time))

    def issue(self, tenant: str, session_id: str, ttl: float = DEFAULT_TTL) -> tuple[str, float]:
        """A token for ``session_id`` of ``tenant`` and when it expires (seconds since the epoch)."""
        expires_at = self._clock() + min(max(ttl, 1.0), MAX_TTL)
        payload = msgspec.json.encode(_Payload(tenant, session_id, round(expires_at, 3)))
        return f"{_b64(payload)}.{_b64(self._sign(payload))}", expires_at

    def verify(self, token: str) -> tuple[str, str] | None:
        """(tenant, session_id) of a valid, unexpired token; None for anything else."""
        body, dot, signature = token.partition(".")
        if not dot or len(token) > 2048:
            return None
        try:
            payload = _unb64(body)
            given = _unb64(signature)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._sign(payload)):
            return None
        try:
            claims = self._decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if claims.e <= self._clock():
            return None
        return claims.t, claims.s

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
