"""Operator mode (JWT) for the tests: nkeys, NATS v2 JWTs signed here, .creds files, and a
configured nats-server started from a config file (no nsc, no sleeps)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]

from blackbird.server.embedded import find_nats_server_binary

#: Account limits without a ceiling (JetStream not included: an account without JETSTREAM has none).
UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
             "conn": -1, "leaf": -1}
#: The JetStream part of an account's limits: enabled, without a ceiling.
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def spawn(config: Path) -> subprocess.Popen[bytes]:
    """nats-server -c ``config``, returned once it printed "Server is ready" (no sleeps)."""
    proc = subprocess.Popen(
        [find_nats_server_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    seen: list[bytes] = []
    for raw in proc.stderr:
        seen.append(raw)
        if b"Server is ready" in raw:
            break
    else:
        raise RuntimeError(f"nats-server exited with {proc.wait()}: {b''.join(seen[-20:]).decode()}")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    return proc


def new_nkey(prefix: int) -> tuple[str, str]:
    """A new nkey of kind ``prefix`` (nkeys.PREFIX_BYTE_*): (public key, seed)."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    kp = nkeys.from_seed(bytearray(seed))
    return kp.public_key.decode(), bytes(seed).decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(issuer_seed: str, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS v2 JWT (header ``ed25519-nkey``) signed by ``issuer_seed``."""
    issuer = nkeys.from_seed(bytearray(issuer_seed.encode()))
    claims: dict[str, Any] = {
        "iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


def creds_text(user_jwt: str, user_seed: str) -> str:
    """The content of a .creds file: the user's JWT and nkey seed."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n"
    )


def user_jwt(
    account_seed: str, name: str, *, publish: list[str] | None = None, subscribe: list[str] | None = None
) -> tuple[str, str]:
    """(a user JWT of the account, the user's seed). ``publish``/``subscribe``: the subjects the
    user may publish/subscribe to (None: any)."""
    public, seed = new_nkey(nkeys.PREFIX_BYTE_USER)
    claims = {
        "type": "user", "subs": -1, "data": -1, "payload": -1,
        "pub": {} if publish is None else {"allow": publish},
        "sub": {} if subscribe is None else {"allow": subscribe},
    }
    return sign_jwt(account_seed, public, name, claims), seed


def jwt_name(creds: str | Path) -> str:
    """The ``name`` claim of the user JWT in a .creds file (what the server reports as the
    ``name_tag`` of the user in ``Nats-Request-Info``)."""
    lines = Path(creds).read_text().splitlines()
    token = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
    body = token.split(".")[1]
    name: str = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["name"]
    return name
