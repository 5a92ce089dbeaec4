"""Data keys wrapped under a master key (KEK) on a real nats-server and LanceDB: nothing in the
bucket, the log or the store's files opens a memory without the master key; the wrong master
key is refused with a typed error; rotation rewraps every record; the key file is made once."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js import JetStreamContext

from blackbird import AsyncBlackbird
from blackbird.config import build_settings
from blackbird.errors import LogError, ValidationError
from blackbird.memory.keys import BUCKET, UserKeys, _decode_record, _kv_key
from blackbird.memory.master_key import (
    MasterKeys,
    default_key_file,
    key_id,
    load_master_keys,
    read_key_file,
    rotate_master_key,
)

from .conftest import TEST_MASTER_KEY, NatsServer

pytestmark = pytest.mark.anyio

TEXT = "The vault combination is Okapi-Lantern-5521."
NEEDLE = b"Okapi-Lantern-5521"
KEY_STREAM = f"KV_{BUCKET}"


def store_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in Path(folder).rglob("*") if p.is_file())


async def raw_messages(js: JetStreamContext, stream: str) -> dict[str, bytes]:
    """Every message the stream holds, subject -> body (the last per subject), read by sequence."""
    info = await js.stream_info(stream)
    found: dict[str, bytes] = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        found[msg.subject] = bytes(msg.data or b"")
    return found


async def record_of(js: JetStreamContext, tenant: str, user_id: str) -> bytes:
    msg = await js.get_msg(KEY_STREAM, subject=f"$KV.{BUCKET}.{_kv_key(tenant, user_id)}")
    return bytes(msg.data or b"")


def kek_of(record: bytes) -> bytes:
    assert record[0] == 2 and len(record) == 77, record[:1]
    return record[9:17]


async def remember(bb: AsyncBlackbird, user_id: str, text: str = TEXT) -> str:
    s = await bb.session_manager.create_session(user_id, tier="pro")
    await bb.memory.remember(text, session_id=s.session_id)
    return str(s.session_id)


async def recalled(bb: AsyncBlackbird, session_id: str, query: str = "vault combination") -> list[str]:
    return [m.text for m in await bb.memory.recall(query, session_id=session_id)]


def keys_of(bb: AsyncBlackbird) -> UserKeys:
    keys: UserKeys = bb.memory._keys
    return keys


@pytest.fixture
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BLACKBIRD_MASTER_KEY: the data folder's key file (or nothing) applies."""
    monkeypatch.delenv("BLACKBIRD_MASTER_KEY", raising=False)


# -------------------------------------------------------------------------- nothing in the clear


async def test_neither_the_data_key_nor_the_text_is_in_the_bucket_the_log_or_the_store(
    nats_server: NatsServer,
) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        await remember(bb, "alice")
        await remember(bb, "leaver", "The leaver's locker holds Okapi-Lantern-5521 too.")
        data_key = await keys_of(bb).key("acme", "alice")  # for the comparison only
        leaver_key = await keys_of(bb).key("acme", "leaver")
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            keys = await raw_messages(js, KEY_STREAM)
            log = await raw_messages(js, bb.settings.stream)
            record = await record_of(js, "acme", "alice")
            leaver_record = await record_of(js, "acme", "leaver")
        finally:
            await nc.close()
        assert record in keys.values() and log  # the reads see the stream's messages
        for body in [*keys.values(), *log.values()]:
            assert data_key not in body and leaver_key not in body and NEEDLE not in body

        # The record opens under the master key only, and only as alice's entry.
        master = AESGCM(base64.b64decode(TEST_MASTER_KEY))
        name = _kv_key("acme", "alice")
        assert master.decrypt(record[17:29], record[29:], record[:17] + name.encode()) == data_key
        with pytest.raises(InvalidTag):
            AESGCM(os.urandom(32)).decrypt(record[17:29], record[29:], record[:17] + name.encode())
        with pytest.raises(ValidationError) as refused:
            _decode_record(record, name, MasterKeys.generate())
        assert refused.value.field == "master_key"
        ring = MasterKeys([base64.b64decode(TEST_MASTER_KEY)], source="test")
        with pytest.raises(LogError, match="copied from another user's entry"):
            _decode_record(record, _kv_key("acme", "leaver"), ring)  # moved to another user

        await bb.memory.forget_user("leaver")
        nc = await nats.connect(nats_server.url)
        try:
            assert leaver_record not in (await raw_messages(nc.jetstream(), KEY_STREAM)).values()
        finally:
            await nc.close()

    nats_server.process.terminate()  # a graceful stop flushes every block to disk
    nats_server.process.wait(timeout=30)
    on_disk = store_bytes(nats_server.store)
    assert record in on_disk  # the scan sees the wrapped records
    for secret in (data_key, leaver_key, NEEDLE, leaver_record):
        assert secret not in on_disk


# -------------------------------------------------------------------------- the wrong master key


async def test_the_wrong_master_key_is_refused_and_the_right_one_recalls(
    nats_server: NatsServer, tmp_path: Path, no_env_key: None
) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", master_key=TEST_MASTER_KEY) as bb:
        session_id = await remember(bb, "alice")

    other = base64.b64encode(os.urandom(32)).decode()
    wrong_file = tmp_path / "wrong.key"
    wrong_file.write_text(other + "\n")
    for options in ({"master_key": other}, {"master_key_file": str(wrong_file)}):
        with pytest.raises(ValidationError, match="wrong master key") as refused:
            async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", **options):
                pass
        assert refused.value.field == "master_key"
        assert key_id(base64.b64decode(TEST_MASTER_KEY)).hex() in str(refused.value)

    right_file = tmp_path / "right.key"
    right_file.write_text(f"# the deployment's key\n{TEST_MASTER_KEY}\n")
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", master_key_file=str(right_file)) as bb:
        assert await recalled(bb, session_id) == [TEXT]


async def test_a_client_on_an_external_server_without_a_master_key_does_not_open(
    nats_server: NatsServer, no_env_key: None
) -> None:
    with pytest.raises(ValidationError, match="master_key_file") as refused:
        async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme"):
            pass
    assert refused.value.field == "master_key"
    # a remote client (it only sends commands) opens, and refuses only what needs the key
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", remote=True) as client:
        assert keys_of(client).master_keys is None


# -------------------------------------------------------------------------- rotation


async def test_rotation_rewraps_every_record_and_drops_the_old_key(tmp_path: Path, no_env_key: None) -> None:
    data = tmp_path / "data"
    async with AsyncBlackbird(data_dir=data, tenant="acme") as bb:
        alice = await remember(bb, "alice")
        bob = await remember(bb, "bob", "Bob's vault combination is Okapi-Lantern-5521 as well.")
        await remember(bb, "leaver")
        await bb.memory.forget_user("leaver")
        old = read_key_file(default_key_file(data)).current
        assert kek_of(await record_of(keys_of(bb)._js, "acme", "alice")) == old.kid

        # a record from before wrapping (version 1: the data key in the clear) is read, then rewrapped
        legacy_key = os.urandom(32)
        kv = await keys_of(bb)._js.key_value(BUCKET)
        await kv.put(_kv_key("acme", "legacy"), b"\x01" + os.urandom(8) + legacy_key)
        assert await keys_of(bb).key("acme", "legacy") == legacy_key
        alice_key = await keys_of(bb).key("acme", "alice")

        report = await rotate_master_key(bb)
        assert report.generated and report.rewrapped == 3 and report.already_current == 0
        assert report.previous_key_ids == [old.kid.hex()]
        ring = read_key_file(default_key_file(data))
        assert [k.kid.hex() for k in ring.keys] == [report.key_id] != [old.kid.hex()]  # old key gone
        js = keys_of(bb)._js
        for user in ("alice", "bob", "legacy"):
            assert kek_of(await record_of(js, "acme", user)) == ring.current.kid
        assert await keys_of(bb).forgotten("acme", "leaver")  # stays forgotten
        assert legacy_key not in b"".join((await raw_messages(js, KEY_STREAM)).values())
        assert await recalled(bb, alice) == [TEXT]

        # The records need the new key: under the old one alone they do not open.
        record = await record_of(js, "acme", "alice")
        with pytest.raises(ValidationError) as refused:
            _decode_record(record, _kv_key("acme", "alice"), MasterKeys([old.secret], source="old"))
        assert refused.value.field == "master_key"
        assert _decode_record(record, _kv_key("acme", "alice"), ring)[0].key == alice_key

        again = await rotate_master_key(bb)  # nothing left under an old key but the new one's records
        assert again.rewrapped == 3 and again.already_current == 0

    with pytest.raises(ValidationError, match="wrong master key"):
        async with AsyncBlackbird(data_dir=data, tenant="acme", master_key=base64.b64encode(old.secret).decode()):
            pass
    async with AsyncBlackbird(data_dir=data, tenant="acme") as bb:  # a new process, the file's key
        assert await recalled(bb, alice) == [TEXT]
        assert await recalled(bb, bob, "Bob's vault") == ["Bob's vault combination is Okapi-Lantern-5521 as well."]
        rotated = await rotate_master_key(bb)
        assert rotated.rewrapped == 3


async def test_rotation_with_the_master_key_setting_rewraps_under_its_first_key(
    nats_server: NatsServer,
) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        session_id = await remember(bb, "alice")
    new = base64.b64encode(os.urandom(32)).decode()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", master_key=f"{new},{TEST_MASTER_KEY}") as bb:
        report = await rotate_master_key(bb)
        assert not report.generated and report.key_file is None and report.rewrapped == 1
        assert report.key_id == key_id(base64.b64decode(new)).hex()
    with pytest.raises(ValidationError, match="wrong master key"):
        async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme"):  # the old key only
            pass
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", master_key=new) as bb:
        assert await recalled(bb, session_id) == [TEXT]


# -------------------------------------------------------------------------- the key file


async def test_the_key_file_is_made_0600_in_a_0700_folder_on_first_use(tmp_path: Path, no_env_key: None) -> None:
    data = tmp_path / "data"
    async with AsyncBlackbird(data_dir=data, tenant="acme") as bb:
        session_id = await remember(bb, "alice")
        path = default_key_file(data)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        ring = read_key_file(path)
        assert len(ring.keys) == 1
        assert kek_of(await record_of(keys_of(bb)._js, "acme", "alice")) == ring.current.kid
        assert ring.current.secret not in store_bytes(data / "nats")  # never next to the data
    before = path.read_bytes()
    async with AsyncBlackbird(data_dir=data, tenant="acme") as bb:  # reopened: the same key
        assert await recalled(bb, session_id) == [TEXT]
    assert path.read_bytes() == before


def test_concurrent_first_opens_of_one_folder_make_one_key(tmp_path: Path, no_env_key: None) -> None:
    settings = build_settings(data_dir=tmp_path / "data")
    start = threading.Barrier(16)
    found: list[bytes] = []
    errors: list[BaseException] = []

    def open_keys() -> None:
        try:
            start.wait()
            ring = load_master_keys(settings, tmp_path / "data")
            assert ring is not None
            found.append(ring.current.kid)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_keys) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(found) == 16 and len(set(found)) == 1
    assert read_key_file(default_key_file(tmp_path / "data")).current.kid == found[0]
    leftovers = sorted(p.name for p in default_key_file(tmp_path / "data").parent.iterdir())
    assert leftovers == ["master.key"]  # no temporary file left behind


async def test_two_clients_opening_one_new_folder_at_once_share_one_key(tmp_path: Path, no_env_key: None) -> None:
    data = tmp_path / "data"
    async with (
        AsyncBlackbird(data_dir=data, tenant="acme") as first,
        AsyncBlackbird(data_dir=data, tenant="acme") as second,
    ):
        session_id = await remember(first, "alice")
        assert await recalled(second, session_id) == [TEXT]
        rings: list[Any] = [keys_of(first).master_keys, keys_of(second).master_keys]
        assert rings[0].current.kid == rings[1].current.kid


def test_malformed_keys_are_refused_without_echoing_them(tmp_path: Path, no_env_key: None) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("c2VjcmV0LWJ1dC1zaG9ydA==\n")
    with pytest.raises(ValidationError) as refused:
        load_master_keys(build_settings(master_key_file=str(bad)), None)
    assert refused.value.field == "master_key_file" and "c2VjcmV0" not in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        load_master_keys(build_settings(master_key="not base64!"), None)
    assert refused.value.field == "master_key"
