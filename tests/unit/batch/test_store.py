"""The store against a real Redis: each move checks the state it leaves, a line
is finished once however many runners race, ownership, the runner's lease."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ssw.batch.states import BatchStatus, JobStatus
from ssw.batch.store import PREFIX, BatchStore, Done
from tests.harness.stack import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[BatchStore]:
    s = BatchStore(redis_server.url, tmp_path, retain_s=3600)
    s.prepare()
    await s.redis.flushdb()
    yield s
    await s.close()


def writer(data: bytes):  # type: ignore[no-untyped-def]
    return lambda path: path.write_bytes(data)


async def test_a_line_is_finished_once_however_many_race(store: BatchStore) -> None:
    batch_id = await store.create_batch("k", {"endpoint": "/v1/completions"}, 3)
    results = await asyncio.gather(*(store.finish_line(batch_id, 1, Done(f"r{i}", i, 5, True)) for i in range(50)))
    assert sum(results) == 1
    winner = results.index(True)
    assert (await store.done(batch_id))[1] == Done(f"r{winner}", winner, 5, True)
    assert await store.finish_line(batch_id, 2, Done("r", 0, 1, False))
    record = await store.batch(batch_id)
    assert record is not None and (record["completed"], record["failed"]) == ("1", "1")


async def test_moves_check_the_state_they_leave(store: BatchStore) -> None:
    batch_id = await store.create_batch("k", {}, 1)
    assert await store.move_batch(batch_id, BatchStatus.IN_PROGRESS)
    assert not await store.move_batch(batch_id, BatchStatus.IN_PROGRESS)
    assert await store.move_batch(batch_id, BatchStatus.CANCELLING)
    assert not await store.move_batch(batch_id, BatchStatus.COMPLETED)  # only from finalizing
    assert await store.move_batch(batch_id, BatchStatus.FINALIZING, final_status="cancelled")
    assert await store.move_batch(batch_id, BatchStatus.CANCELLED, output_file_id="file-x")
    record = await store.batch(batch_id)
    assert record is not None
    assert record["status"] == "cancelled" and record["output_file_id"] == "file-x"
    assert int(record["cancelled_at"]) >= int(record["created_at"])
    # A finished batch leaves the runner's list and expires with its lines.
    assert batch_id not in await store.active_batches()
    assert 0 < await store.redis.ttl(PREFIX + "batch:" + batch_id) <= 3600


async def test_another_owner_sees_nothing(store: BatchStore) -> None:
    batch_id = await store.create_batch("alice", {}, 1)
    file = await store.add_file("alice", "in.jsonl", "batch", 3, writer(b"abc"))
    job = await store.create_job("alice", {"endpoint": "/v1/completions"}, b"{}")
    assert await store.batch(batch_id, "bob") is None
    assert await store.file_record(file["id"], "bob") is None
    assert await store.job(job["id"], "bob") is None
    assert not await store.delete_file(file["id"], "bob")
    assert await store.list_files("bob", None, 10, None, True) == []
    assert await store.list_batches("bob", None, 10) == []
    assert [f["id"] for f in await store.list_files("alice", "batch", 10, None, True)] == [file["id"]]
    assert await store.read_file(file["id"]) == b"abc"
    assert await store.delete_file(file["id"], "alice")
    assert not store.file_path(file["id"]).exists()
    # Ids that are not ours never reach Redis keys or paths.
    assert await store.batch("../../etc") is None and await store.file_record("file-../x", None) is None


async def test_job_moves_and_request_file(store: BatchStore) -> None:
    job = await store.create_job("k", {"endpoint": "/v1/completions"}, b'{"model": "m"}')
    assert store.job_path(job["id"], "request").read_bytes() == b'{"model": "m"}'
    assert await store.move_job(job["id"], JobStatus.RUNNING)
    assert await store.move_job(job["id"], JobStatus.QUEUED)  # cut short: waits again
    assert await store.move_job(job["id"], JobStatus.RUNNING)
    assert await store.move_job(job["id"], JobStatus.CANCELLED)
    assert not await store.move_job(job["id"], JobStatus.SUCCEEDED)  # a cancelled job's answer is dropped
    assert job["id"] not in await store.active_jobs()
    assert not store.job_path(job["id"], "request").exists()


async def test_the_lease_has_one_holder(store: BatchStore) -> None:
    assert await store.hold_lease("a", 10)
    assert await store.hold_lease("a", 10)  # renewed
    assert not await store.hold_lease("b", 10)
    assert not await store.drop_lease("b")
    assert await store.lease_holder() == "a"
    await store.release_lease("a")
    assert await store.hold_lease("b", 10)


async def test_sweep_removes_what_redis_forgot(store: BatchStore, tmp_path: Path) -> None:
    kept = await store.add_file("k", "in.jsonl", "batch", 1, writer(b"x"))
    orphan = tmp_path / "files" / ("file-" + "0" * 24)
    orphan.write_bytes(b"old")
    fresh = tmp_path / "files" / ("file-" + "1" * 24)
    fresh.write_bytes(b"being written")
    old = time.time() - 7200
    for path in (orphan, store.file_path(kept["id"])):
        os.utime(path, (old, old))
    assert await store.sweep() == 1
    assert not orphan.exists() and fresh.exists() and store.file_path(kept["id"]).exists()
