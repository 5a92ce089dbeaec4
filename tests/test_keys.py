"""Per-user data keys (crypto-shredding) on a real nats-server: sealing, forgetting, races."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from blackbird.errors import LogError, ValidationError
from blackbird.memory.keys import BUCKET, DecryptionError, UserKeys, _kv_key
from blackbird.memory.master_key import MasterKeys
from tests.conftest import NatsServer

pytestmark = pytest.mark.anyio

STREAM = f"KV_{BUCKET}"
MASTER_KEYS = MasterKeys.generate()


async def open_keys(js: JetStreamContext, **options: Any) -> UserKeys:
    return await UserKeys.open(js, master_keys=MASTER_KEYS, **options)


async def record_of(keys: UserKeys, tenant: str, user_id: str) -> bytes:
    """The user's record in the bucket as stored (wrapped)."""
    latest = await keys._latest(_kv_key(tenant, user_id))
    assert latest is not None and latest.data
    return bytes(latest.data)


@pytest.fixture
async def keys(nc: NATS) -> UserKeys:
    return await open_keys(nc.jetstream())


async def stored_messages(js: JetStreamContext) -> list[bytes]:
    """Every data key record the bucket's stream still holds, read sequence by sequence."""
    info = await js.stream_info(STREAM)
    bodies = []
    for seq in range(1, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(STREAM, seq=seq)
        except nats.js.errors.NotFoundError:
            continue  # erased or rolled up
        if msg.subject == f"$KV.{BUCKET}._master_key":
            continue  # names the master key, holds no data key
        bodies.append(msg.data or b"")
    return bodies


# -------------------------------------------------------------------------- sealing


async def test_sealed_data_round_trips(keys: UserKeys) -> None:
    blob = await keys.encrypt("acme", "u1", b"remember the milk", aad=b"memory-1")
    assert b"remember the milk" not in blob
    assert len(blob) == len(b"remember the milk") + 37
    assert await keys.decrypt("acme", "u1", blob, aad=b"memory-1") == b"remember the milk"
    assert await keys.decrypt("acme", "u1", await keys.encrypt("acme", "u1", b"")) == b""


async def test_each_seal_uses_a_fresh_nonce(keys: UserKeys) -> None:
    first = await keys.encrypt("acme", "u1", b"same")
    second = await keys.encrypt("acme", "u1", b"same")
    assert first != second


async def test_keys_are_256_bit_and_stable_per_user(keys: UserKeys) -> None:
    key = await keys.key("acme", "u1")
    assert len(key) == 32
    assert await keys.key("acme", "u1") == key
    assert await keys.key("acme", "u2") != key


async def test_another_users_key_cannot_open_a_blob(keys: UserKeys) -> None:
    blob = await keys.encrypt("acme", "alice", b"alice's secret")
    await keys.key("acme", "bob")
    assert await keys.decrypt("acme", "bob", blob) is None
    assert await keys.decrypt("acme", "alice", blob) == b"alice's secret"


async def test_same_user_id_in_two_tenants_gets_two_keys(keys: UserKeys) -> None:
    assert await keys.key("acme", "u1") != await keys.key("globex", "u1")
    blob = await keys.encrypt("acme", "u1", b"acme only")
    assert await keys.decrypt("globex", "u1", blob) is None


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
async def test_an_altered_blob_is_rejected(keys: UserKeys, where: str) -> None:
    blob = bytearray(await keys.encrypt("acme", "u1", b"pay 10 EUR", aad=b"m1"))
    index = {"nonce": 9, "ciphertext": 21, "tag": len(blob) - 1}[where]
    blob[index] ^= 0x01
    with pytest.raises(DecryptionError, match="failed authentication") as caught:
        await keys.decrypt("acme", "u1", bytes(blob), aad=b"m1")
    assert caught.value.reason == "authentication_failed"
    assert (caught.value.tenant, caught.value.user_id) == ("acme", "u1")


async def test_a_blob_opened_with_another_aad_is_rejected(keys: UserKeys) -> None:
    blob = await keys.encrypt("acme", "u1", b"value", aad=b"key-a")
    with pytest.raises(DecryptionError):
        await keys.decrypt("acme", "u1", blob, aad=b"key-b")


@pytest.mark.parametrize("cut", [0, 1, 20, 36])
async def test_a_truncated_or_foreign_blob_is_malformed(keys: UserKeys, cut: int) -> None:
    blob = await keys.encrypt("acme", "u1", b"")
    with pytest.raises(DecryptionError, match="expected a version-1 sealed blob") as caught:
        await keys.decrypt("acme", "u1", blob[:cut])
    assert caught.value.reason == "malformed"
    with pytest.raises(DecryptionError, match="starting with version 2"):
        await keys.decrypt("acme", "u1", b"\x02" + blob[1:])


async def test_any_id_text_works_as_tenant_and_user(keys: UserKeys) -> None:
    odd = ["a.b", "*", ">", "with space", "ünï/cödé", "x" * 300, "a\x00b", "=="]
    sealed = {u: await keys.encrypt("t.*>", u, u.encode()) for u in odd}
    for user, blob in sealed.items():
        assert await keys.decrypt("t.*>", user, blob) == user.encode()
    assert len({await keys.key("t.*>", u) for u in odd}) == len(odd)


@pytest.mark.parametrize(("tenant", "user_id"), [("", "u1"), ("acme", "")])
async def test_empty_ids_are_refused(keys: UserKeys, tenant: str, user_id: str) -> None:
    with pytest.raises(ValidationError, match="expected a non-empty string"):
        await keys.key(tenant, user_id)


async def test_decrypting_never_creates_a_key(keys: UserKeys, nc: NATS) -> None:
    other = await keys.encrypt("acme", "someone", b"x")
    assert await keys.decrypt("acme", "nobody", other) is None
    assert not await keys.forgotten("acme", "nobody")
    assert len(await stored_messages(nc.jetstream())) == 1  # only someone's key


# -------------------------------------------------------------------------- forgetting


async def test_forgotten_key_makes_old_data_unreadable_and_new_data_gets_a_new_key(
    keys: UserKeys,
) -> None:
    old_key = await keys.key("acme", "u1")
    old_blob = await keys.encrypt("acme", "u1", b"before", aad=b"m")
    assert not await keys.forgotten("acme", "u1")

    await keys.forget("acme", "u1")

    assert await keys.forgotten("acme", "u1")
    assert await keys.decrypt("acme", "u1", old_blob, aad=b"m") is None
    new_blob = await keys.encrypt("acme", "u1", b"after", aad=b"m")
    assert await keys.key("acme", "u1") != old_key
    assert not await keys.forgotten("acme", "u1")
    assert await keys.decrypt("acme", "u1", new_blob, aad=b"m") == b"after"
    assert await keys.decrypt("acme", "u1", old_blob, aad=b"m") is None


async def test_forget_is_idempotent_and_spares_other_users(keys: UserKeys) -> None:
    kept = await keys.encrypt("acme", "u2", b"still here")
    await keys.forget("acme", "u1")  # never had a key
    await keys.forget("acme", "u1")
    assert await keys.forgotten("acme", "u1")
    assert await keys.decrypt("acme", "u2", kept) == b"still here"
    assert not await keys.forgotten("acme", "u2")


async def test_forget_leaves_no_revision_of_the_key_in_the_bucket(keys: UserKeys, nc: NATS) -> None:
    js = nc.jetstream()
    await keys.key("acme", "u1")
    await keys.key("acme", "u2")
    # the records as stored (wrapped): the data keys themselves are never in the bucket
    old_key, other_key = await record_of(keys, "acme", "u1"), await record_of(keys, "acme", "u2")
    assert any(old_key in body for body in await stored_messages(js))

    await keys.forget("acme", "u1")
    await keys.key("acme", "u1")
    new_key = await record_of(keys, "acme", "u1")

    bodies = await stored_messages(js)
    assert not any(old_key in body for body in bodies)
    assert any(other_key in body for body in bodies)
    assert any(new_key in body for body in bodies)
    kv = await js.key_value(BUCKET)
    history = await kv.history(_kv_key("acme", "u1"))
    assert all(old_key not in (entry.value or b"") for entry in history)


async def test_forgotten_key_bytes_are_erased_from_the_servers_disk(
    nats_server: NatsServer, keys: UserKeys
) -> None:
    await keys.key("acme", "u1")
    await keys.key("acme", "u2")
    forgotten, kept = await record_of(keys, "acme", "u1"), await record_of(keys, "acme", "u2")  # wrapped

    def on_disk(key: bytes) -> bool:
        return any(key in p.read_bytes() for p in Path(nats_server.store).rglob("*") if p.is_file())

    with anyio.fail_after(20):  # the key is written to the store's files before it is forgotten
        while not on_disk(forgotten):
            await anyio.sleep(0.02)  # polling a condition, with the deadline above
    await keys.forget("acme", "u1")
    # A graceful stop flushes every block to disk.
    nats_server.process.terminate()
    nats_server.process.wait(timeout=30)

    files = [p.read_bytes() for p in Path(nats_server.store).rglob("*") if p.is_file()]
    assert any(kept in data for data in files)  # the scan does see keys
    assert not any(forgotten in data for data in files)


async def test_forget_drops_the_cached_key(keys: UserKeys) -> None:
    old = await keys.key("acme", "u1")  # now cached
    await keys.forget("acme", "u1")
    assert await keys.key("acme", "u1") != old


# -------------------------------------------------------------------------- two processes


async def test_two_processes_racing_to_create_a_key_end_with_one(
    nats_server: NatsServer, nc: NATS
) -> None:
    users = [f"u{i}" for i in range(40)]
    other_nc = await nats.connect(nats_server.url)
    try:
        first = await open_keys(nc.jetstream())
        second = await open_keys(other_nc.jetstream())
        found: dict[tuple[int, str], bytes] = {}

        async def fetch(n: int, keys: UserKeys, user: str) -> None:
            found[(n, user)] = await keys.key("acme", user)

        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(fetch, 1, first, user)
                tg.start_soon(fetch, 2, second, user)

        for user in users:
            assert found[(1, user)] == found[(2, user)]
        assert len({found[(1, u)] for u in users}) == len(users)
        assert len(await stored_messages(nc.jetstream())) == len(users)
    finally:
        await other_nc.close()


def both_read_before_either_writes(*instances: UserKeys) -> list[int]:
    """Hold each instance's first bucket read until every instance has made its own, so all of
    them see the same state and then race to create. Returns a list counting the reads."""
    reads: list[int] = []
    all_read = anyio.Event()
    for keys in instances:
        original = keys._latest

        async def latest(name: str, original: Any = original) -> Any:
            msg = await original(name)
            reads.append(1)
            if len(reads) == len(instances):
                all_read.set()
            if len(reads) <= len(instances):
                await all_read.wait()
            return msg

        keys._latest = latest  # type: ignore[method-assign]
    return reads


@pytest.mark.parametrize("forgotten_before", [False, True])
async def test_two_processes_that_both_saw_no_key_end_with_the_winners(
    nats_server: NatsServer, nc: NATS, forgotten_before: bool
) -> None:
    other_nc = await nats.connect(nats_server.url)
    try:
        first = await open_keys(nc.jetstream())
        second = await open_keys(other_nc.jetstream())
        if forgotten_before:
            await first.key("acme", "u1")
            await first.forget("acme", "u1")
        reads = both_read_before_either_writes(first, second)
        found: dict[int, bytes] = {}

        async def fetch(n: int, keys: UserKeys) -> None:
            found[n] = await keys.key("acme", "u1")

        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, 1, first)
            tg.start_soon(fetch, 2, second)

        assert found[1] == found[2]
        assert len(reads) == 3  # the loser's create failed and it read the winner's key
        assert not await first.forgotten("acme", "u1")
    finally:
        await other_nc.close()


async def test_a_key_created_while_a_forget_runs_is_destroyed_too(
    nats_server: NatsServer, nc: NATS
) -> None:
    other_nc = await nats.connect(nats_server.url)
    try:
        forgetter = await open_keys(nc.jetstream())
        writer = await open_keys(other_nc.jetstream(), cache_ttl=0)
        old = await forgetter.key("acme", "u1")
        racing: list[bytes] = []
        original = forgetter._erase

        async def erase_then_let_a_writer_in(seq: int) -> None:
            await original(seq)
            if not racing:  # between the erase and the purge marker
                racing.append(await writer.key("acme", "u1"))

        forgetter._erase = erase_then_let_a_writer_in  # type: ignore[method-assign]
        await forgetter.forget("acme", "u1")

        assert racing and racing[0] != old
        assert await writer.forgotten("acme", "u1")
        bodies = await stored_messages(nc.jetstream())
        assert not any(old in body or racing[0] in body for body in bodies)
    finally:
        await other_nc.close()


async def test_a_forget_in_another_process_is_seen_once_the_cache_expires(
    nats_server: NatsServer, nc: NATS
) -> None:
    other_nc = await nats.connect(nats_server.url)
    try:
        writer = await open_keys(nc.jetstream())
        reader = await open_keys(other_nc.jetstream(), cache_ttl=0)
        blob = await writer.encrypt("acme", "u1", b"x")
        assert await reader.decrypt("acme", "u1", blob) == b"x"
        await writer.forget("acme", "u1")
        assert await reader.decrypt("acme", "u1", blob) is None
        assert await reader.forgotten("acme", "u1")
        # The reader sees the writer's new key, not a stale one.
        fresh = await writer.encrypt("acme", "u1", b"y")
        assert await reader.decrypt("acme", "u1", fresh) == b"y"
    finally:
        await other_nc.close()


async def test_a_stale_cached_key_is_refreshed_for_a_blob_under_a_newer_key(
    nats_server: NatsServer, nc: NATS
) -> None:
    other_nc = await nats.connect(nats_server.url)
    try:
        writer = await open_keys(nc.jetstream())
        reader = await open_keys(other_nc.jetstream())  # caches for 30 s
        await reader.decrypt("acme", "u1", await writer.encrypt("acme", "u1", b"old"))
        await writer.forget("acme", "u1")
        fresh = await writer.encrypt("acme", "u1", b"new")
        assert await reader.decrypt("acme", "u1", fresh) == b"new"
    finally:
        await other_nc.close()


# -------------------------------------------------------------------------- the bucket


async def test_without_create_a_missing_bucket_fails_on_first_use(nc: NATS) -> None:
    keys = await open_keys(nc.jetstream(), create=False)
    with pytest.raises(LogError, match="key bucket bb_keys does not exist"):
        await keys.key("acme", "u1")
    await open_keys(nc.jetstream())  # a host creates it
    assert len(await keys.key("acme", "u1")) == 32


async def test_a_plain_kv_bucket_is_refused_because_it_cannot_erase(nc: NATS) -> None:
    js = nc.jetstream()
    await js.create_key_value(bucket=BUCKET, history=1)
    with pytest.raises(LogError, match="forgotten keys would stay readable on disk"):
        await open_keys(js)


async def test_opening_twice_reuses_the_bucket(keys: UserKeys, nc: NATS) -> None:
    key = await keys.key("acme", "u1")
    again = await open_keys(nc.jetstream())
    assert await again.key("acme", "u1") == key
    info = await nc.jetstream().stream_info(STREAM)
    assert info.config.max_msgs_per_subject == 1
    assert not info.config.deny_delete
