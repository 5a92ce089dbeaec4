"""Per-user data keys for crypto-shredding, kept outside the log in the ``bb_keys`` KV bucket.

What a user writes is sealed with their own AES-256-GCM key before it reaches the log. The key
lives in a KV bucket, never in the log, so destroying it (:meth:`UserKeys.forget`) leaves the
log's bytes in place but makes them unreadable for good.

Destroying a key means more than a KV purge: a purge only hides a message, and JetStream's file
store keeps its bytes on disk until the block is rewritten. ``forget`` first deletes the key's
message with JetStream's secure erase (the server overwrites it with random bytes), then writes
the purge marker. That needs a bucket that allows message deletes, which a bucket made by
``js.create_key_value`` or ``nats kv add`` does not (and cannot be changed to): :meth:`open`
creates ``bb_keys`` itself and refuses a bucket that would keep erased keys readable. With
replicas > 1, a key's bytes also stay in the stream's Raft log until the next Raft snapshot.

Data keys are stored wrapped under a master key (key-encryption key, see
:mod:`blackbird.memory.master_key`): whoever reads the bucket without it cannot unseal
anything. Key record layout (version 2, 77 bytes)::

    0x02 | data key id (8) | master key id (8) | nonce (12) | AES-GCM(master key, data key) (32 + 16)

The wrap authenticates the first 17 bytes and the record's KV key (``<tenant>.<user>``), so a
record copied to another user's entry does not open. A version-1 record (``0x01 | data key id
| data key``, plaintext, written before wrapping) is still read; :meth:`UserKeys.rotate`
rewraps it. The bucket also holds the entry ``_master_key`` (``0x02 | master key id``): the
master key the records are wrapped under, checked by :meth:`UserKeys.open` so a client with the
wrong master key fails there (ValidationError naming ``master_key``), not on first use.

Sealed blob layout (version 1)::

    0x01 | key id (8 bytes) | nonce (12 bytes) | AES-GCM ciphertext + tag (16 bytes)

The key id names the key that sealed the blob, so a blob sealed under a forgotten key reads as
forgotten (``None``), not as tampered, even after the user has a new key. The version byte and
the key id are authenticated together with the caller's ``aad``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import nats.js.errors
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, Header, StorageType, StreamConfig, StreamInfo
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, MSG_ROLLUP_SUBJECT

from blackbird._retry import Bucket, retrying
from blackbird.errors import DecryptionError, LogError, ValidationError
from blackbird.memory.master_key import MasterKeys, missing_master_key, wrong_master_key

T = TypeVar("T")

__all__ = ["BUCKET", "DecryptionError", "RewrapCounts", "UserKeys"]

#: The KV bucket holding every user's data key.
BUCKET = "bb_keys"
_STREAM = f"KV_{BUCKET}"
_SUBJECT_PREFIX = f"$KV.{BUCKET}."

_BLOB_VERSION = 1
_PLAIN_RECORD_VERSION = 1  # before wrapping: read, never written
_RECORD_VERSION = 2
_KID_SIZE = 8
_KEY_SIZE = 32  # AES-256
_NONCE_SIZE = 12  # 96-bit GCM nonce
_TAG_SIZE = 16
_HEADER_SIZE = 1 + _KID_SIZE
_PLAIN_RECORD_SIZE = 1 + _KID_SIZE + _KEY_SIZE
_WRAP_HEADER_SIZE = 1 + _KID_SIZE + _KID_SIZE  # version | data key id | master key id
_RECORD_SIZE = _WRAP_HEADER_SIZE + _NONCE_SIZE + _KEY_SIZE + _TAG_SIZE
#: The entry naming the master key the records are wrapped under (user entries have a dot).
_MASTER_ENTRY = "_master_key"

_CACHE_LIMIT = 10_000  # users whose keys stay in memory (least recently used leave first)
_ATTEMPTS = 10  # rounds of a create/forget race lost before giving up
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream err_codes for a failed expected sequence
_STREAM_NAME_IN_USE = 10058


# a purge marker that lands only on an empty subject (no key created since it was erased)
_PURGE_IF_EMPTY = {
    KV_OP: KV_PURGE,
    Header.ROLLUP.value: MSG_ROLLUP_SUBJECT,
    Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0",
}


class _BucketMissingError(LogError):
    """``bb_keys`` does not exist and this process may not create it."""


class _DataKey(NamedTuple):
    kid: bytes
    key: bytes
    aead: AESGCM


class RewrapCounts(NamedTuple):
    """What :meth:`UserKeys.rotate` did."""

    rewrapped: int  # records wrapped again under the current master key
    current: int  # records that were wrapped under it already


class UserKeys:
    """Per-user AES-256-GCM data keys in the ``bb_keys`` bucket, cached in memory.

    Safe to share between tasks, and between processes on the same bucket: two of them creating
    the same user's key at once end with one key. Use :meth:`open` to make one.
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        create: bool,
        replicas: int,
        cache_ttl: float,
        contexts: Callable[[float], JetStreamContext] | None = None,
        timeout: float = 10.0,
        master_keys: MasterKeys | None = None,
    ):
        self.master_keys = master_keys
        self._js = js
        self._contexts = contexts or (lambda _: js)
        self._timeout = timeout
        self._create_bucket = create
        self._replicas = replicas
        self._cache_ttl = cache_ttl
        self._kv: Bucket | None = None
        self._direct = False
        self._cache: OrderedDict[tuple[str, str], tuple[_DataKey, float]] = OrderedDict()
        # Bumped by every forget: a key read before a forget finished is not cached after it.
        self._epoch = 0

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        *,
        replicas: int = 1,
        create: bool = True,
        cache_ttl: float = 30.0,
        contexts: Callable[[float], JetStreamContext] | None = None,
        timeout: float = 10.0,
        master_keys: MasterKeys | None = None,
    ) -> UserKeys:
        """Bind to the ``bb_keys`` bucket; with ``create``, create it (``replicas`` replicas) if
        missing. An existing bucket is used as it is.

        Without ``create`` a missing bucket is looked up again on first use (a host may create
        it later) and LogError is raised then if it is still missing. LogError is also raised
        for a bucket that keeps more than one revision per key or denies message deletes: it
        could not destroy keys for good.

        ``cache_ttl`` (seconds) bounds how long a key stays cached in this process: a ``forget``
        made by another process is seen here at most that late (until then this process can
        still open, and seal under, the forgotten key). 0 reads the bucket on every call.

        Every request is retried through a NATS failover for ``timeout`` seconds, on a short
        per-try timeout when ``contexts`` gives JetStream contexts by timeout (the journal's
        ``contexts``; else each try waits as long as ``js`` does), then raises LogError.

        ``master_keys`` wrap and unwrap the data keys. Without them only version-1 (plaintext)
        records can be read: creating a key, or reading a wrapped one, raises ValidationError
        (``master_key``). With them, a bucket whose records are wrapped under a master key not
        among them raises ValidationError (``master_key``) here; a bucket that names none yet
        is marked with the current one.
        """
        keys = cls(
            js, create=create, replicas=replicas, cache_ttl=cache_ttl, contexts=contexts, timeout=timeout,
            master_keys=master_keys,
        )
        with contextlib.suppress(_BucketMissingError):
            await keys._bucket()
            if master_keys is not None:
                await keys._check_master_key(master_keys)
        return keys

    # ------------------------------------------------------------------ public API

    async def key(self, tenant: str, user_id: str) -> bytes:
        """The user's 256-bit data key, created (randomly) if they have none.

        After :meth:`forget`, this creates a new key: what was sealed before stays unreadable.
        """
        return (await self._sealing_key(tenant, user_id)).key

    async def encrypt(
        self, tenant: str, user_id: str, plaintext: bytes, *, aad: bytes = b""
    ) -> bytes:
        """Seal ``plaintext`` with the user's key (created if needed) and a random nonce.

        ``aad`` is authenticated, not stored: pass the same bytes to :meth:`decrypt`. Returns
        the sealed blob (layout in the module docstring), 37 bytes longer than ``plaintext``.
        """
        data_key = await self._sealing_key(tenant, user_id)
        header = bytes([_BLOB_VERSION]) + data_key.kid
        nonce = os.urandom(_NONCE_SIZE)
        return header + nonce + data_key.aead.encrypt(nonce, plaintext, header + aad)

    async def mac(self, tenant: str, user_id: str, data: bytes) -> str:
        """A keyed fingerprint of ``data`` under the user's key (HMAC-SHA256 with a key derived
        from it, hex): equal for equal data, meaningless without the key, so it may travel with
        a command (a retry of a sealed write is recognised by it) and dies with an erasure."""
        data_key = await self._sealing_key(tenant, user_id)
        mac_key = hashlib.sha256(b"blackbird memory fingerprint v1\x00" + data_key.key).digest()
        return hmac.new(mac_key, data, hashlib.sha256).hexdigest()[:32]

    async def decrypt(
        self, tenant: str, user_id: str, blob: bytes, *, aad: bytes = b""
    ) -> bytes | None:
        """Open a blob sealed by :meth:`encrypt` for this user, or None if it cannot be any more.

        None means the key that sealed ``blob`` is not the user's current key: it was forgotten
        (crypto-shredded), or the blob was sealed for another user. Never creates a key.
        Raises DecryptionError if the user's key sealed the blob but it does not open with
        ``aad`` (altered, truncated, other ``aad``) or if ``blob`` is not a sealed blob.
        """
        if len(blob) < _HEADER_SIZE + _NONCE_SIZE + _TAG_SIZE or blob[0] != _BLOB_VERSION:
            raise DecryptionError(
                f"blob for user {user_id!r}: expected a version-{_BLOB_VERSION} sealed blob of "
                f"at least {_HEADER_SIZE + _NONCE_SIZE + _TAG_SIZE} bytes, got {len(blob)} bytes"
                + (f" starting with version {blob[0]}" if blob else ""),
                tenant=tenant,
                user_id=user_id,
                reason="malformed",
            )
        header, kid = blob[:_HEADER_SIZE], blob[1:_HEADER_SIZE]
        nonce = blob[_HEADER_SIZE : _HEADER_SIZE + _NONCE_SIZE]
        data_key = self._cached(tenant, user_id)
        if data_key is None or data_key.kid != kid:
            data_key = await self._data_key(tenant, user_id, create=False, fresh=True)
        if data_key is None or data_key.kid != kid:
            return None
        try:
            return data_key.aead.decrypt(nonce, blob[_HEADER_SIZE + _NONCE_SIZE :], header + aad)
        except InvalidTag:
            raise DecryptionError(
                f"blob for user {user_id!r} in tenant {tenant!r} failed authentication: it was "
                "altered or truncated, or sealed with a different aad",
                tenant=tenant,
                user_id=user_id,
                reason="authentication_failed",
            ) from None

    async def forget(self, tenant: str, user_id: str) -> None:
        """Destroy the user's key: erase it from the bucket's storage and leave a purge marker.

        Everything sealed with it becomes unreadable, in every process (another process may
        still use a cached copy for up to its ``cache_ttl``). Idempotent. A key created
        concurrently with the forget is destroyed too, so a write racing an erasure is lost.
        """
        name = _kv_key(tenant, user_id)
        await self._bucket()
        self._drop(tenant, user_id)
        for _ in range(_ATTEMPTS):
            latest = await self._latest(name)
            if latest is not None:
                if _operation(latest) in (KV_PURGE, KV_DEL):
                    break  # forgotten already
                await self._erase(int(latest.seq))
            try:
                # The subject is empty now: the marker only lands if no key was created since.
                # (A try whose answer was lost may have landed: the next round then finds it.)
                await self._retry(
                    f"forget key of {user_id!r}",
                    lambda js: js.publish(_SUBJECT_PREFIX + name, b"", headers=_PURGE_IF_EMPTY),
                    expected=(nats.js.errors.BadRequestError,),
                )
                break
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code not in _WRONG_LAST_SEQUENCE:
                    raise LogError(f"forget key of {user_id!r}: {exc.description}") from None
        else:
            raise LogError(f"forget key of {user_id!r}: lost {_ATTEMPTS} races with its creation")
        self._drop(tenant, user_id)

    async def forgotten(self, tenant: str, user_id: str) -> bool:
        """Whether the user's key was forgotten and no new key was created since.

        False for a user who never had a key. Always reads the bucket (not the cache).
        """
        await self._bucket()
        latest = await self._latest(_kv_key(tenant, user_id))
        return latest is not None and _operation(latest) in (KV_PURGE, KV_DEL)

    async def rotate(self) -> RewrapCounts:
        """Rewrap every record of the bucket under the current master key (version-1 records
        too); the ``_master_key`` entry then names it.

        Each record is rewritten only if it is still the one read (expected last subject
        sequence), so a key created or forgotten meanwhile is not overwritten: a forgotten
        key stays forgotten. Records created while this runs are rewrapped by a second pass.
        Raises ValidationError (``master_key``) without master keys or if a record is wrapped
        under a key the ring does not hold.
        """
        ring = self.master_keys
        if ring is None:
            raise missing_master_key()
        bucket = await self._bucket()
        seen: set[str] = set()
        rewrapped: set[str] = set()
        for _ in range(_ATTEMPTS):  # until a pass finds nothing left to rewrap
            done = 0
            for name in await self._names(bucket):
                if name == _MASTER_ENTRY:
                    continue
                if await self._rewrap(name, ring):
                    rewrapped.add(name)
                    done += 1
                seen.add(name)
            if not done:
                break
        else:
            raise LogError(f"rewrap {BUCKET}: records still change after {_ATTEMPTS} passes")
        await self._mark_master_key(ring.sealing().kid, replace=True)
        return RewrapCounts(len(rewrapped), len(seen - rewrapped))

    async def _names(self, bucket: Bucket) -> list[str]:
        """The bucket's entries that hold a record (not forgotten)."""
        try:
            return await retrying(
                f"list the entries of {BUCKET}", lambda js: bucket(js).keys(), self._contexts,
                timeout=self._timeout, per_try=self._timeout, expected=(nats.js.errors.NoKeysError,),
            )
        except nats.js.errors.NoKeysError:
            return []

    async def _rewrap(self, name: str, ring: MasterKeys) -> bool:
        """Rewrap one entry's record under the current master key unless it is wrapped under it
        already or holds none (forgotten); whether it was rewritten."""
        for _ in range(_ATTEMPTS):
            latest = await self._latest(name)
            if latest is None or _operation(latest) is not None:
                return False  # gone or forgotten: stays so
            data_key, kek = _decode_record(latest.data, name, self.master_keys)
            master = ring.sealing()
            if kek == master.kid:
                return False
            try:
                await self._replace(name, _wrap(name, data_key, master.kid, master.aead), int(latest.seq))
                return True
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code not in _WRONG_LAST_SEQUENCE:
                    raise LogError(f"rewrap the key entry {name}: {exc.description}") from None
                # changed meanwhile (forgotten, created again, or a try of ours that landed)
        raise LogError(f"rewrap the key entry {name}: lost {_ATTEMPTS} races with its changes")

    async def _replace(self, name: str, record: bytes, seq: int) -> None:
        """Write ``record`` to entry ``name`` if its last message is still at ``seq``."""
        headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(seq)}
        await self._retry(
            f"rewrap the key entry {name}",
            lambda js: js.publish(_SUBJECT_PREFIX + name, record, headers=headers),
            expected=(nats.js.errors.BadRequestError,),
        )

    async def _check_master_key(self, ring: MasterKeys) -> None:
        """Raise ValidationError (``master_key``) if the bucket's records are wrapped under a
        master key the ring does not hold; mark a bucket that names none with the current."""
        for _ in range(_ATTEMPTS):
            latest = await self._latest(_MASTER_ENTRY)
            if latest is not None and _operation(latest) is None:
                kek = _master_entry(latest.data)
                if ring.find(kek) is None:
                    raise wrong_master_key(kek, ring)
                return
            if not self._create_bucket:
                return  # not marked yet: a host marks it
            if await self._mark_master_key(ring.sealing().kid, replace=False):
                return
        raise LogError(f"mark the master key in {BUCKET}: lost {_ATTEMPTS} races")

    async def _mark_master_key(self, kek: bytes, *, replace: bool) -> bool:
        """Write the ``_master_key`` entry (``replace``: over any, else only where there is
        none); whether it was written."""
        bucket = await self._bucket()
        value = bytes([_RECORD_VERSION]) + kek
        if replace:
            await self._retry(f"mark the master key in {BUCKET}", lambda js: bucket(js).put(_MASTER_ENTRY, value))
            return True
        try:
            await self._retry(
                f"mark the master key in {BUCKET}", lambda js: bucket(js).create(_MASTER_ENTRY, value),
                expected=(nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError),
            )
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return False  # marked meanwhile (or a try of ours landed): read it again
        return True

    # ------------------------------------------------------------------ bucket

    async def _retry(
        self,
        what: str,
        op: Callable[[JetStreamContext], Awaitable[T]],
        *,
        expected: tuple[type[BaseException], ...] = (),
    ) -> T:
        return await retrying(what, op, self._contexts, timeout=self._timeout, expected=expected)

    async def _bucket(self) -> Bucket:
        if self._kv is not None:
            return self._kv
        try:
            info = await self._retry(
                f"read key bucket {BUCKET}", lambda js: js.stream_info(_STREAM),
                expected=(nats.js.errors.NotFoundError,),
            )
        except nats.js.errors.NotFoundError:
            if not self._create_bucket:
                raise _BucketMissingError(
                    f"key bucket {BUCKET} does not exist: open UserKeys with create=True in a "
                    "process allowed to configure JetStream (an actor host) first"
                ) from None
            info = await self._create_stream()
        _check_bucket(info)
        # Direct gets may be answered by a follower that lags; only with one replica are they
        # as fresh as a leader read.
        self._direct = bool(info.config.allow_direct) and info.config.num_replicas == 1
        self._kv = Bucket(BUCKET, direct=self._direct)
        return self._kv

    async def _create_stream(self) -> StreamInfo:
        # The layout of a KV bucket, except that message deletes are allowed (secure erase).
        config = StreamConfig(
            name=_STREAM,
            description="Blackbird per-user data keys (crypto-shredding)",
            subjects=[f"{_SUBJECT_PREFIX}>"],
            storage=StorageType.FILE,
            num_replicas=self._replicas,
            max_msgs_per_subject=1,
            max_msgs=-1,
            max_bytes=-1,
            max_consumers=-1,
            discard=DiscardPolicy.NEW,
            duplicate_window=120,
            allow_rollup_hdrs=True,
            allow_direct=True,
            deny_delete=False,
            deny_purge=False,
        )
        try:
            return await self._retry(
                f"create key bucket {BUCKET}", lambda js: js.add_stream(config),
                expected=(nats.js.errors.BadRequestError,),
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise LogError(f"could not create key bucket {BUCKET}: {exc.description}") from None
            # created meanwhile, differently
            return await self._retry(f"read key bucket {BUCKET}", lambda js: js.stream_info(_STREAM))

    async def _latest(self, name: str) -> Any:
        try:
            return await self._retry(
                f"read key bucket {BUCKET}",
                lambda js: js.get_msg(_STREAM, subject=_SUBJECT_PREFIX + name, direct=self._direct),
                expected=(nats.js.errors.NotFoundError,),
            )
        except nats.js.errors.NotFoundError:
            return None

    async def _erase(self, seq: int) -> None:
        try:
            await self._retry(  # secure erase: overwritten on disk
                f"erase a key of {BUCKET}", lambda js: js.delete_msg(_STREAM, seq),
                expected=(nats.js.errors.APIError,),
            )
        except nats.js.errors.APIError as exc:
            # A concurrent forget (or a try whose answer was lost) may have erased it first;
            # anything else must not pass.
            try:
                await self._retry(
                    f"read key bucket {BUCKET}", lambda js: js.get_msg(_STREAM, seq=seq),
                    expected=(nats.js.errors.NotFoundError,),
                )
            except nats.js.errors.NotFoundError:
                return
            raise LogError(
                f"could not erase key at sequence {seq} of {_STREAM}: {exc.description}"
            ) from None

    # ------------------------------------------------------------------ keys and cache

    async def _sealing_key(self, tenant: str, user_id: str) -> _DataKey:
        data_key = await self._data_key(tenant, user_id, create=True)
        assert data_key is not None  # created if missing
        return data_key

    async def _data_key(
        self, tenant: str, user_id: str, *, create: bool, fresh: bool = False
    ) -> _DataKey | None:
        if not fresh and (cached := self._cached(tenant, user_id)) is not None:
            return cached
        name = _kv_key(tenant, user_id)
        bucket = await self._bucket()
        epoch = self._epoch
        for _ in range(_ATTEMPTS):
            latest = await self._latest(name)
            data_key: _DataKey | None = None
            if latest is not None and _operation(latest) is None:
                data_key, _ = _decode_record(latest.data, name, self.master_keys, user_id)
            if data_key is None and create:
                if self.master_keys is None:
                    raise missing_master_key()
                master = self.master_keys.sealing()
                kid, key = os.urandom(_KID_SIZE), os.urandom(_KEY_SIZE)
                data_key = _DataKey(kid, key, AESGCM(key))
                record = _wrap(name, data_key, master.kid, master.aead)
                try:
                    # Creates only if the user has no key; after a forget, only on its marker.
                    await self._create(bucket, name, record, user_id)
                except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                    # another process created it first (or forgot it), or a try of ours whose
                    # answer was lost did land: read again
                    continue
            if data_key is not None and epoch == self._epoch:
                self._remember(tenant, user_id, data_key)
            return data_key
        raise LogError(f"key of {user_id!r}: lost {_ATTEMPTS} races creating or reading it")

    async def _create(self, bucket: Bucket, name: str, record: bytes, user_id: str) -> None:
        await self._retry(
            f"create the key of {user_id!r}", lambda js: bucket(js).create(name, record),
            expected=(
                nats.js.errors.KeyWrongLastSequenceError,
                nats.js.errors.KeyNotFoundError,  # a concurrent forget emptied the subject
            ),
        )

    def _cached(self, tenant: str, user_id: str) -> _DataKey | None:
        entry = self._cache.get((tenant, user_id))
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._cache[(tenant, user_id)]
            return None
        self._cache.move_to_end((tenant, user_id))
        return entry[0]

    def _remember(self, tenant: str, user_id: str, data_key: _DataKey) -> None:
        if self._cache_ttl <= 0:
            return
        self._cache[(tenant, user_id)] = (data_key, time.monotonic() + self._cache_ttl)
        self._cache.move_to_end((tenant, user_id))
        while len(self._cache) > _CACHE_LIMIT:
            self._cache.popitem(last=False)

    def _drop(self, tenant: str, user_id: str) -> None:
        self._epoch += 1
        self._cache.pop((tenant, user_id), None)


def _kv_key(tenant: str, user_id: str) -> str:
    """``<tenant>.<user>``, each urlsafe base64: KV keys allow only [-/_=.a-zA-Z0-9], ids any
    text, and a tenant's keys stay under one subject prefix (``$KV.bb_keys.<tenant>.>``)."""
    for field, value in (("tenant", tenant), ("user_id", user_id)):
        if not isinstance(value, str) or not value:
            raise ValidationError(
                f"{field}: expected a non-empty string, got {value!r}",
                field=field,
                expected="a non-empty string",
                got=value,
            )
    return f"{_token(tenant)}.{_token(user_id)}"


def _token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode("utf-8", "surrogatepass")).decode()


def _operation(msg: Any) -> str | None:
    headers = msg.headers or {}
    return headers.get(KV_OP)


def _wrap(name: str, data_key: _DataKey, kek: bytes, aead: AESGCM) -> bytes:
    """The version-2 record of ``data_key`` for entry ``name``, wrapped under master key ``kek``."""
    header = bytes([_RECORD_VERSION]) + data_key.kid + kek
    nonce = os.urandom(_NONCE_SIZE)
    return header + nonce + aead.encrypt(nonce, data_key.key, header + name.encode())


def _decode_record(
    data: bytes | None, name: str, ring: MasterKeys | None, user_id: str | None = None
) -> tuple[_DataKey, bytes | None]:
    """The data key of entry ``name``'s record and the id of the master key that wrapped it
    (None for a version-1 plaintext record)."""
    what = f"key of {user_id!r}" if user_id is not None else f"key entry {name}"
    if data and len(data) == _PLAIN_RECORD_SIZE and data[0] == _PLAIN_RECORD_VERSION:
        kid, key = data[1 : 1 + _KID_SIZE], data[1 + _KID_SIZE :]
        return _DataKey(kid, key, AESGCM(key)), None
    if not data or len(data) != _RECORD_SIZE or data[0] != _RECORD_VERSION:
        raise LogError(
            f"{what} in bucket {BUCKET}: expected a {_RECORD_SIZE}-byte version-{_RECORD_VERSION} "
            f"record, got {len(data or b'')} bytes"
        )
    header = data[:_WRAP_HEADER_SIZE]
    kid, kek = data[1 : 1 + _KID_SIZE], data[1 + _KID_SIZE : _WRAP_HEADER_SIZE]
    if ring is None:
        raise missing_master_key()
    master = ring.find(kek)
    if master is None:
        raise wrong_master_key(kek, ring)
    nonce = data[_WRAP_HEADER_SIZE : _WRAP_HEADER_SIZE + _NONCE_SIZE]
    try:
        key = master.aead.decrypt(nonce, data[_WRAP_HEADER_SIZE + _NONCE_SIZE :], header + name.encode())
    except InvalidTag:
        raise LogError(
            f"{what} in bucket {BUCKET} failed authentication under master key {kek.hex()}: the "
            "record was altered or copied from another user's entry"
        ) from None
    return _DataKey(kid, key, AESGCM(key)), kek


def _master_entry(data: bytes | None) -> bytes:
    if not data or len(data) != 1 + _KID_SIZE or data[0] != _RECORD_VERSION:
        raise LogError(
            f"entry {_MASTER_ENTRY} of bucket {BUCKET}: expected {1 + _KID_SIZE} bytes, got {len(data or b'')}"
        )
    return data[1:]


def _check_bucket(info: StreamInfo) -> None:
    config = info.config
    if config.max_msgs_per_subject != 1 or config.deny_delete or not config.allow_rollup_hdrs:
        raise LogError(
            f"key bucket {BUCKET} keeps {config.max_msgs_per_subject} revisions per key, "
            f"deny_delete={config.deny_delete}, allow_rollup={config.allow_rollup_hdrs}: "
            "expected 1, False, True, or forgotten keys would stay readable on disk. Copy its "
            f"keys out, delete stream {_STREAM}, let UserKeys.open create it, and copy them "
            "back (deleting it without copying forgets every user)"
        )
