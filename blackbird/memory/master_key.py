"""The master key (KEK) wrapping each user's data key in ``bb_keys``: its sources, file, rotation.

Each user's data key is stored in the ``bb_keys`` bucket wrapped (AES-256-GCM) under a master
key, so reading the bucket is not enough to open anyone's memories. The master keys a client
holds are a :class:`MasterKeys` ring: the *current* key wraps new records, *previous* keys
only open records not rewrapped yet (during a rotation).

Where they come from, first match wins (:func:`load_master_keys`):

1. the ``master_key`` setting (``BLACKBIRD_MASTER_KEY``): base64 of 32 bytes; several keys
   separated by commas or whitespace, the first current;
2. the ``master_key_file`` setting: a key file;
3. ``<data_dir>/keys/master.key`` when the client has a data folder (embedded server,
   development mode), generated on first use.

With none of them a client hosting actors does not open (ValidationError naming
``master_key``). Key file format: one base64 key per line, the first current, those after it
previous keys; blank lines and lines starting with ``#`` are ignored. It is created 0600 in a
0700 folder, atomically (written aside, then hard-linked into place: of two processes creating
it at once one wins, and both use its key); it is rewritten by renaming a new file over it.

A key's id is the first 8 bytes of its SHA-256: records name the key that wrapped them by it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgspec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blackbird.errors import ValidationError

__all__ = [
    "KEY_FILE",
    "MasterKey",
    "MasterKeys",
    "RotationReport",
    "add_master_key",
    "create_key_file",
    "default_key_file",
    "drop_previous_keys",
    "key_id",
    "load_master_keys",
    "read_key_file",
    "rotate_master_key",
]

#: The key file's path inside a data folder.
KEY_FILE = Path("keys") / "master.key"
KEY_SIZE = 32  # AES-256
KID_SIZE = 8

_HEADER = "# Blackbird master keys: one base64 key per line, the first current (keep this file secret)\n"
_SETTINGS_HELP = (
    "set master_key (BLACKBIRD_MASTER_KEY: base64 of 32 random bytes, e.g. from "
    "`python -c \"import os, base64; print(base64.b64encode(os.urandom(32)).decode())\"`) or "
    "master_key_file (BLACKBIRD_MASTER_KEY_FILE: a file holding that line), the same on every "
    "process of the deployment"
)


class MasterKey(NamedTuple):
    kid: bytes
    secret: bytes
    aead: AESGCM


def key_id(secret: bytes) -> bytes:
    """The 8-byte id of a master key: the first bytes of its SHA-256."""
    return hashlib.sha256(secret).digest()[:KID_SIZE]


def default_key_file(data_dir: str | Path) -> Path:
    """``<data_dir>/keys/master.key``: the key file a client with a data folder uses by default."""
    return Path(data_dir) / KEY_FILE


class MasterKeys:
    """A ring of master keys: :attr:`current` wraps, any of them unwraps (by key id).

    One read from a file (``path``) follows the file: when it was replaced (another process
    rotated it), :meth:`refresh` reads it again, as do :meth:`sealing` and :meth:`find` (for an
    unknown id) before they answer.
    """

    def __init__(self, secrets: Sequence[bytes], *, source: str, path: Path | None = None) -> None:
        if not secrets:
            raise ValueError("a master key ring needs at least one key")
        self.source = source
        self.path = path
        self._stamp = _stamp(path) if path is not None else None
        self._keys: list[MasterKey] = []
        self._set(secrets)

    @classmethod
    def generate(cls) -> MasterKeys:
        """A ring of one new random key, held in memory only (tests, tools)."""
        return cls([os.urandom(KEY_SIZE)], source="a generated key")

    def _set(self, secrets: Sequence[bytes]) -> None:
        self._keys = [MasterKey(key_id(s), s, AESGCM(s)) for s in secrets]

    @property
    def current(self) -> MasterKey:
        return self._keys[0]

    @property
    def keys(self) -> list[MasterKey]:
        """Every key, the current first."""
        return list(self._keys)

    def ids(self) -> list[str]:
        """The keys' ids in hex, the current first."""
        return [k.kid.hex() for k in self._keys]

    def sealing(self) -> MasterKey:
        """The current key, after following a replaced key file."""
        self.refresh()
        return self.current

    def find(self, kid: bytes) -> MasterKey | None:
        """The key with this id, or None (after reading a replaced key file again)."""
        for key in self._keys:
            if key.kid == kid:
                return key
        if self.refresh():
            return self.find(kid)
        return None

    def refresh(self) -> bool:
        """Read the key file again if it changed since it was read; whether it did."""
        if self.path is None:
            return False
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        secrets = _read(self.path)
        self._stamp = stamp
        changed = [key_id(s) for s in secrets] != [k.kid for k in self._keys]
        self._set(secrets)
        return changed


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------- parsing


def parse_keys(text: str, *, field: str, source: str, lines: bool) -> list[bytes]:
    """The keys of a key file (``lines``: one per line, ``#`` comments) or of the
    ``master_key`` setting (separated by commas or whitespace); ValidationError naming ``field``."""
    if lines:
        items = [ln.strip() for ln in text.splitlines()]
        items = [i for i in items if i and not i.startswith("#")]
    else:
        items = [i for i in re.split(r"[,\s]+", text.strip()) if i]
    expected = "base64 of 32 random bytes (44 characters), one per line, the first current"
    if not items:
        raise ValidationError(f"{field}: {source} holds no key", field=field, expected=expected, got=None)
    secrets: list[bytes] = []
    for n, item in enumerate(items, 1):
        try:
            secret = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            secret = b""
        if len(secret) != KEY_SIZE:
            # never echo the value: it may be a real key, mistyped
            raise ValidationError(
                f"{field}: key {n} of {source} is not base64 of {KEY_SIZE} bytes",
                field=field, expected=expected, got=f"{len(item)} characters",
            )
        if secret not in secrets:
            secrets.append(secret)
    return secrets


def _read(path: Path) -> list[bytes]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(
            f"master_key_file: cannot read {path}: {exc}", field="master_key_file",
            expected="a readable key file", got=str(path),
        ) from None
    return parse_keys(text, field="master_key_file", source=str(path), lines=True)


def read_key_file(path: str | Path) -> MasterKeys:
    """The ring a key file holds (ValidationError naming ``master_key_file`` if it cannot)."""
    path = Path(path)
    ring = MasterKeys(_read(path), source=str(path), path=path)
    return ring


def _format(secrets: Sequence[bytes]) -> bytes:
    return (_HEADER + "".join(base64.b64encode(s).decode() + "\n" for s in secrets)).encode("ascii")


@contextlib.contextmanager
def _aside(path: Path, content: bytes) -> Iterator[Path]:
    """``content`` in a new 0600 file beside ``path`` (flushed to disk), removed on the way out."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, content)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        yield Path(name)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _make_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def create_key_file(path: str | Path) -> bool:
    """Create the key file with one new random key unless it exists; whether this call did.

    Safe against a concurrent creation by another process: the file is written aside and
    hard-linked into place, which fails if a file is there already; then that file stands.
    """
    path = Path(path)
    _make_folder(path.parent)
    if path.exists():
        return False
    with _aside(path, _format([os.urandom(KEY_SIZE)])) as temp:
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
    _sync_folder(path.parent)
    return True


def _replace(path: Path, secrets: Sequence[bytes]) -> None:
    with _aside(path, _format(secrets)) as temp:
        os.replace(temp, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (POSIX; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_master_key(path: str | Path) -> bytes:
    """Put a new random key first in the key file, keeping the keys it held after it (they
    still open records wrapped under them); returns the new key's id. Creates the file if
    missing."""
    path = Path(path)
    _make_folder(path.parent)
    with _locked(path):
        old = _read(path) if path.exists() else []
        secret = os.urandom(KEY_SIZE)
        _replace(path, [secret, *old])
    return key_id(secret)


def drop_previous_keys(path: str | Path, current: bytes) -> int:
    """Keep only the key with id ``current`` in the key file (it must be the first); returns
    how many keys were dropped. Run it once no record is wrapped under the others."""
    path = Path(path)
    with _locked(path):
        secrets = _read(path)
        if key_id(secrets[0]) != current:
            raise ValidationError(
                f"master_key_file: {path} changed during the rotation (its current key is "
                f"{key_id(secrets[0]).hex()}, not {current.hex()}); run the rotation again",
                field="master_key_file", expected=f"current key {current.hex()}", got=key_id(secrets[0]).hex(),
            )
        if len(secrets) > 1:
            _replace(path, secrets[:1])
    return len(secrets) - 1


# --------------------------------------------------------------------------- loading


def load_master_keys(settings: Any, data_dir: str | Path | None, *, required: bool = True) -> MasterKeys | None:
    """The master keys of a client with these settings (:class:`blackbird.config.Settings`)
    and data folder: ``master_key``, else ``master_key_file``, else
    ``<data_dir>/keys/master.key`` (created on first use).

    None if none applies and not ``required``; ValidationError naming ``master_key`` if
    ``required`` (or if both settings are given, or one is malformed).
    """
    inline: str | None = getattr(settings, "master_key", None)
    file: str | None = getattr(settings, "master_key_file", None)
    if inline is not None and file is not None:
        raise ValidationError(
            "master_key: both master_key and master_key_file are set; set one",
            field="master_key", expected="master_key or master_key_file, not both", got=None,
        )
    if inline is not None:
        return MasterKeys(
            parse_keys(inline, field="master_key", source="the master_key setting", lines=False),
            source="the master_key setting (BLACKBIRD_MASTER_KEY)",
        )
    if file is not None:
        return read_key_file(Path(file).expanduser())
    if data_dir is not None:
        path = default_key_file(data_dir)
        create_key_file(path)
        return read_key_file(path)
    if not required:
        return None
    raise missing_master_key()


def missing_master_key() -> ValidationError:
    return ValidationError(
        "master_key: no master key to wrap the users' data keys (bb_keys) with: a client "
        f"connected to an external nats_url, without a data folder, has none; {_SETTINGS_HELP}",
        field="master_key", expected="master_key or master_key_file", got=None,
    )


def wrong_master_key(found: bytes, ring: MasterKeys) -> ValidationError:
    """The error for a record wrapped under a master key the ring does not hold."""
    return ValidationError(
        f"master_key: the data keys in bb_keys are wrapped under master key {found.hex()}, which "
        f"is not among this client's master keys ({', '.join(ring.ids())}, from {ring.source}): "
        f"the wrong master key is configured; {_SETTINGS_HELP} to the key that wrapped them",
        field="master_key", expected=f"the master key with id {found.hex()}", got=ring.ids(),
    )


# --------------------------------------------------------------------------- rotation


class RotationReport(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`rotate_master_key` did."""

    key_id: str  # hex id of the master key every record is wrapped under now
    previous_key_ids: list[str]  # the keys it replaced (dropped from the key file)
    rewrapped: int  # records wrapped again under key_id
    already_current: int  # records that were wrapped under key_id already
    generated: bool  # a new key was generated into the key file (False: master_key setting)
    key_file: str | None  # the key file rewritten, if any


class _HostsMemory(Protocol):
    """What :func:`rotate_master_key` needs of an open AsyncBlackbird."""

    @property
    def memory(self) -> Any: ...


async def rotate_master_key(bb: _HostsMemory) -> RotationReport:
    """Rotate the master key of an open :class:`~blackbird.AsyncBlackbird` (any mode).

    With a key file (``master_key_file`` or ``<data_dir>/keys/master.key``): a new key is
    generated and put first in the file (the old ones kept after it), every record of
    ``bb_keys`` is rewrapped under it, then the old keys are dropped from the file. Other
    processes reading the same file follow it. With the ``master_key`` setting nothing can be
    written: put the new key first in it (the old one after it) on every process, then call
    this to rewrap every record under it, then remove the old one.

    Forgotten users stay forgotten; records created meanwhile are rewrapped too. Raises
    ValidationError (``master_key``) if the client has no master key.
    """
    keys = bb.memory._keys  # the client's UserKeys
    ring: MasterKeys | None = keys.master_keys
    if ring is None:
        raise missing_master_key()
    previous = ring.ids()
    generated = False
    if ring.path is not None:
        add_master_key(ring.path)
        ring.refresh()
        generated = True
    current = ring.sealing()
    counts = await keys.rotate()
    if ring.path is not None:
        drop_previous_keys(ring.path, current.kid)
        ring.refresh()
    return RotationReport(
        key_id=current.kid.hex(),
        previous_key_ids=[kid for kid in previous if kid != current.kid.hex()],
        rewrapped=counts.rewrapped,
        already_current=counts.current,
        generated=generated,
        key_file=None if ring.path is None else str(ring.path),
    )
