"""Negative controls: each "nothing wrong" check is shown to find the wrong thing when it is
there. A corrupted read model makes ``verify()`` name the projection and the field, and
``blackbird audit verify`` exit 1; erasure is shown to remove what was present before it (see
``test_forget_user_*`` below)."""

from __future__ import annotations

import base64
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js import JetStreamContext

from actors.events import MemoryRemembered
from blackbird import AsyncBlackbird, QuotaType
from blackbird.memory.index import Sealed
from blackbird.memory.keys import UserKeys

from .conftest import TEST_MASTER_KEY, NatsServer
from .test_audit import run_cli

pytestmark = pytest.mark.anyio



# --------------------------------------------------------------------------- verify


async def _activity_with_usage(bb: AsyncBlackbird) -> None:
    await bb.session_manager.create_session("u1", session_id="s1")
    await bb.session_manager.track_usage("s1", "llm", QuotaType.TOKENS, 150)


async def test_verify_names_the_projection_and_field_of_a_corrupted_live_model(bb: AsyncBlackbird) -> None:
    await _activity_with_usage(bb)
    assert await bb.projections.verify() == {"abuse": [], "activity": [], "graph": []}  # clean first

    runner = await bb.projections.caught_up("activity", await bb.journal.stream_last_seq())
    runner.model.tenants["acme"].counters.events += 1000  # a counter the log does not support
    del runner.model.tenants["acme"].users["u1"].counters.operations["llm"]  # a key gone

    found = await bb.projections.verify()
    assert found["abuse"] == []
    assert len(found["activity"]) == 2, found
    events, missing = sorted(found["activity"])
    assert events.startswith("activity.tenants.acme.counters.events: live '100") and "rebuilt '" in events
    assert missing == "activity.tenants.acme.users.u1.counters.operations.llm: only in rebuilt"
    assert await bb.audit.verify() == found  # the audit facade reports the same


async def test_cli_audit_verify_exits_1_naming_a_corrupted_checkpoint_and_0_once_rebuilt(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    async with AsyncBlackbird(nats_url=url, tenant="acme") as bb:
        await _activity_with_usage(bb)
        runner = await bb.projections.caught_up("activity", await bb.journal.stream_last_seq())
        assert await runner.checkpoint()  # a clean checkpoint the command line starts from

        code, out, err = await run_cli("audit", "verify", "--tenant", "acme", "--nats-url", url)
        assert (code, out) == (0, "activity: OK\ngraph: OK\n"), err

        # A bad checkpoint: the model stored in bb_projections counts 7 events the log never held.
        runner.model.tenants["acme"].counters.events += 7
        assert await runner.checkpoint()
        code, out, err = await run_cli("audit", "verify", "--tenant", "acme", "--nats-url", url)
        assert code == 1, (out, err)
        lines = out.splitlines()
        assert lines[0] == "activity: 1 difference(s)", out
        assert lines[1].startswith("  activity.tenants.acme.counters.events: live "), out
        assert len(lines) == 3 and lines[2] == "graph: OK", out

        code, out, err = await run_cli("audit", "verify", "--json", "--tenant", "acme", "--nats-url", url)
        assert code == 1, (out, err)
        assert '"activity.tenants.acme.counters.events: live' in out

        await runner.rebuild()  # folds the log again and checkpoints the good model
        code, out, err = await run_cli("audit", "verify", "--tenant", "acme", "--nats-url", url)
        assert (code, out) == (0, "activity: OK\ngraph: OK\n"), err


# --------------------------------------------------------------------------- erasure

SECRET = "Zebra-Quartz-7731 is the name of my private diary"
NEEDLE = b"Zebra-Quartz"
DEADLINE = 20.0  # seconds a condition polled below may take to hold


def folder_bytes(folder: Path) -> bytes:
    """Every file under ``folder``, raw bytes, concatenated."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


async def until(condition: object, what: str) -> None:
    """Poll ``condition()`` (sync or async) until true; fail naming ``what`` after DEADLINE."""
    with anyio.move_on_after(DEADLINE):
        while True:
            result = condition()  # type: ignore[operator]
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)  # a poll interval, not a wait standing in for an event
    pytest.fail(f"not within {DEADLINE}s: {what}")


async def every_bucket(js: JetStreamContext) -> dict[str, bytes]:
    """Every entry of every KV bucket and every object of every object store on the server,
    as ``{"<bucket>/<key>": value}`` (read through the KV and object-store APIs)."""
    found: dict[str, bytes] = {}
    for info in await js.streams_info():
        name = info.config.name or ""
        if name.startswith("KV_"):
            kv = await js.key_value(name[3:])
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            for key in keys:
                entry = await kv.get(key)
                found[f"{name[3:]}/{key}"] = entry.value or b""
        elif name.startswith("OBJ_"):
            store = await js.object_store(name[4:])
            try:
                objects = await store.list()
            except nats.js.errors.NotFoundError:
                objects = []
            for obj in objects:
                try:
                    found[f"{name[4:]}/{obj.name}"] = (await store.get(obj.name)).data or b""
                except nats.js.errors.ObjectNotFoundError:  # replaced between list and get (a checkpoint)
                    continue
    return found


def key_entry(tenant: str, user_id: str) -> str:
    """The user's entry in bb_keys (``<tenant>.<user>``, each urlsafe base64)."""
    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode()

    return f"bb_keys/{b64(tenant)}.{b64(user_id)}"


async def sealed_memories(bb: AsyncBlackbird, user_id: str) -> list[MemoryRemembered]:
    """The MemoryRemembered events ``user_id`` wrote, as the log holds them (sealed)."""
    found: list[MemoryRemembered] = []

    def collect(seq: int, subject: str, commit: object) -> None:
        for applied in commit.commands:  # type: ignore[attr-defined]
            found.extend(e for e in applied.events if isinstance(e, MemoryRemembered) and e.author == user_id)

    await bb.journal.replay(f"{bb.journal.subjects.prefix}.acme.memory.*", 0, collect)
    return found


def unwrap(record: bytes, tenant: str, user_id: str) -> bytes:
    """The data key of a bb_keys record (version 2 | key id (8) | master key id (8) | nonce (12)
    | wrapped key), unwrapped with the tests' master key: the layout is in blackbird.memory.keys."""
    name = key_entry(tenant, user_id).split("/", 1)[1]
    master = AESGCM(base64.b64decode(TEST_MASTER_KEY))
    return master.decrypt(record[17:29], record[29:], record[:17] + name.encode())


def open_with(record: bytes, event: MemoryRemembered) -> str:
    """Open a sealed memory with a bb_keys record (unwrapped with the master key), as anyone
    holding the key could: the layout is in blackbird.memory.keys."""
    header, nonce, body = event.sealed[:9], event.sealed[9:21], event.sealed[21:]
    assert header[1:] == record[1:9], "sealed under another key"
    data_key = unwrap(record, "acme", event.author)
    plain = AESGCM(data_key).decrypt(nonce, body, header + f"{event.scope}:{event.owner}".encode())
    return msgspec.msgpack.decode(plain, type=Sealed).text


async def test_forget_user_removes_what_was_there_from_the_store_every_bucket_and_both_indexes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    # snapshot_every=2: the aggregates (the user's memory scope too) are snapshotted in bb_snapshots
    async with AsyncBlackbird(nats_url=url, tenant="acme", memory_dir=str(tmp_path / "host1"),
                              snapshot_every=2) as bb, \
            AsyncBlackbird(nats_url=url, tenant="acme", memory_dir=str(tmp_path / "host2")) as host2:
        s = await bb.session_manager.create_session("leaver", tier="pro")
        await bb.memory.remember(SECRET, session_id=s.session_id)
        await bb.memory.set("note", {"diary": "Zebra-Quartz-7731"}, session_id=s.session_id)
        stayer = await bb.session_manager.create_session("stayer", tier="pro")
        await bb.memory.remember("The stayer likes tea.", session_id=stayer.session_id, scope="tenant")
        assert (await bb.memory.recall("private diary", session_id=s.session_id))[0].text == SECRET
        await bb.projections.caught_up("activity", await bb.journal.stream_last_seq())
        await (await bb.projections.runner("activity")).checkpoint()  # bb_projections holds a model

        # The second host indexes the memory from the log into its own folder.
        assert (await host2.memory.recall("private diary", session_id=s.session_id))[0].text == SECRET
        await until(lambda: NEEDLE in folder_bytes(tmp_path / "host2"), "the text in host 2's index")

        # BEFORE: the text is in both LanceDB folders; the log holds it sealed only, under a key
        # that is in bb_keys (read through the KV API and as raw bytes in the store folder) and
        # opens the sealed bytes.
        assert NEEDLE in folder_bytes(tmp_path / "host1")
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()

            async def snapshotted() -> bool:
                found = await every_bucket(js)
                return any(k.startswith("bb_snapshots/") and b"leaver" in v for k, v in found.items())

            await until(snapshotted, "a snapshot naming the user in bb_snapshots")
            buckets = await every_bucket(js)
            assert {k.split("/")[0] for k in buckets} == {"bb_keys", "bb_snapshots", "bb_projections",
                                                          "bb_projection_models"}, sorted(buckets)
            # the scan reads each bucket's values: the user's id is in the read model
            assert any(b"leaver" in v for k, v in buckets.items() if k.startswith("bb_projection_models/"))
            record = buckets[key_entry("acme", "leaver")]
            data_key = unwrap(record, "acme", "leaver")
            assert len(data_key) == 32
            # the record is in the store files, wrapped: the data key itself is not
            await until(lambda: record in folder_bytes(nats_server.store), "the key record in the store files")
            assert data_key not in folder_bytes(nats_server.store)
            assert not any(NEEDLE in v for v in buckets.values())  # sealed from the start
            assert NEEDLE not in folder_bytes(nats_server.store)
            sealed = await sealed_memories(bb, "leaver")
            assert sealed and all(open_with(record, e) == SECRET for e in sealed)

            result = await bb.memory.forget_user("leaver")
            assert result["removed"] >= 2

            # AFTER: the key is gone from bb_keys and from every file of the store; what the
            # log still holds cannot be opened; no bucket holds the text or the key.
            buckets = await every_bucket(js)
            assert key_entry("acme", "leaver") not in buckets
            assert not any(NEEDLE in v or record in v or data_key in v for v in buckets.values())
            await until(lambda: record not in folder_bytes(nats_server.store), "the key erased from disk")
            store = folder_bytes(nats_server.store)
            assert NEEDLE not in store
            keys = await UserKeys.open(js, create=False, master_keys=bb.memory._keys.master_keys)
            assert sealed == await sealed_memories(bb, "leaver")  # the sealed bytes stay in the log
            assert all([await keys.decrypt("acme", "leaver", e.sealed, aad=f"{e.scope}:{e.owner}".encode())
                        is None for e in sealed])
        finally:
            await nc.close()

        # Both indexes: the text is gone from every file, once host 2 has applied the erasure.
        assert NEEDLE not in folder_bytes(tmp_path / "host1")
        assert await host2.memory.index.wait_for(
            await bb.journal.last_seq_of(f"{bb.journal.subjects.prefix}.*.memory.*"), DEADLINE
        )
        await until(lambda: NEEDLE not in folder_bytes(tmp_path / "host2"), "the text gone from host 2's index")
        assert await host2.memory.recall("private diary", session_id=s.session_id) == []
        tea = await host2.memory.recall("tea", session_id=stayer.session_id, scopes=["tenant"])
        assert [m.text for m in tea] == ["The stayer likes tea."]  # the others' memories stay
