"""Where the asynchronous tier keeps its work: file contents and results on
disk under ``batch.dir``, their state in Redis, shared by every gateway
process (and a restarted gateway).

Disk, under ``batch.dir``:
- ``files/<file-id>``: an uploaded file, or a batch's output or error file.
- ``results/<batch-id>/<runner-id>.jsonl``: result lines as the runner that
  produced them appended them; only lines Redis records as done are ever read.
- ``jobs/<job-id>.request``, ``jobs/<job-id>.response``: an async request and its answer.

Redis (prefix ``ssw:``):
- ``file:<id>`` (hash), ``files:<owner>`` (index by creation time).
- ``batch:<id>`` (hash: status, timestamps, result file ids), ``batches:<owner>``,
  ``batches:active`` (what the runner works on, oldest first).
- ``batch:<id>:done``: line index -> where its result lies. A line is finished
  exactly when this entry is made, with HSETNX, in the same atomic step that
  counts it (``batch:<id>:counts``): a line is never counted or written twice,
  and the runner never runs a line that has an entry.
- ``job:<id>`` (hash), ``jobs:active``.
- ``batch:runner``: the lease of the one process that runs the work.

Every state change is one Lua step that checks the state it leaves
(:mod:`ssw.batch.states`). Finished batches, jobs and output files expire
after ``batch.retain_s``; an input file stays until its owner deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ssw.batch.states import (
    BATCH_FINAL,
    BATCH_STAMPS,
    JOB_FINAL,
    JOB_STAMPS,
    BatchStatus,
    JobStatus,
    batch_sources,
    job_sources,
)
from ssw.errors import SswError

PREFIX = "ssw:"
FILE_ID = re.compile(r"^file-[0-9a-f]{24}\Z")
BATCH_ID = re.compile(r"^batch_[0-9a-f]{24}\Z")
JOB_ID = re.compile(r"^job_[0-9a-f]{24}\Z")
REDIS_TIMEOUT_S = 5.0

# Move a hash's status only from one of the allowed states, stamping the time
# and setting the given fields in the same step.
_MOVE = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local n = tonumber(ARGV[4])
local ok = false
for i = 5, 4 + n do if ARGV[i] == cur then ok = true end end
if not ok then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
for i = 5 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
# A line is done once: its entry and its count in one step.
_FINISH = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  return 1
end
return 0
"""
# Hold or renew the runner's lease only if it is free or already ours.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StoreUnavailable(SswError):
    status = 503
    type = "service_unavailable"
    code = "store_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.retry_after_s = 5


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Done:
    """Where a finished line's result lies."""

    segment: str
    offset: int
    length: int
    ok: bool

    def encode(self) -> str:
        return f"{self.segment}:{self.offset}:{self.length}:{1 if self.ok else 0}"

    @classmethod
    def decode(cls, value: str) -> Done:
        segment, offset, length, ok = value.rsplit(":", 3)
        return cls(segment, int(offset), int(length), ok == "1")


class BatchStore:
    def __init__(self, redis_url: str, root: Path, retain_s: float) -> None:
        self.root = root
        self.retain_s = max(1, int(retain_s))
        self.redis = aioredis.Redis.from_url(
            redis_url, socket_connect_timeout=2.0, socket_timeout=REDIS_TIMEOUT_S, decode_responses=True
        )
        self._move = self.redis.register_script(_MOVE)
        self._finish = self.redis.register_script(_FINISH)
        self._lease = self.redis.register_script(_LEASE)
        self._drop = self.redis.register_script(_DROP)

    async def close(self) -> None:
        await self.redis.aclose()

    def prepare(self) -> None:
        """Make the directories (blocking; once, at start)."""
        for sub in ("files", "results", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    async def _r(self, call: Awaitable[Any]) -> Any:
        # redis-py's annotations do not know decode_responses: everything here is str.
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the batch store (Redis) cannot be reached: {exc}; retry shortly") from exc

    # --- files ---------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        assert FILE_ID.match(file_id)
        return self.root / "files" / file_id

    async def add_file(
        self,
        owner: str,
        filename: str,
        purpose: str,
        size: int,
        write: Callable[[Path], None],
        keep: bool = True,
        file_id: str | None = None,
    ) -> dict[str, Any]:
        """A new file: ``write(path)`` puts its bytes on disk (in a thread); an input
        file is kept until deleted, an output file (keep False) for retain_s."""
        file_id = file_id or new_id("file-")
        path = self.file_path(file_id)
        tmp = path.with_suffix(".part")
        try:
            await asyncio.to_thread(write, tmp)
            await asyncio.to_thread(os.replace, tmp, path)
        except BaseException:
            await asyncio.to_thread(_unlink, tmp)
            raise
        now = int(time.time())
        record = {
            "id": file_id,
            "owner": owner,
            "bytes": str(size),
            "created_at": str(now),
            "filename": filename,
            "purpose": purpose,
        }
        if not keep:
            record["expires_at"] = str(now + self.retain_s)
        key = PREFIX + "file:" + file_id
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=cast(Any, record))
            if not keep:
                pipe.expire(key, self.retain_s)
            pipe.zadd(PREFIX + "files:" + owner, {file_id: now})
            await self._r(pipe.execute())
        except StoreUnavailable:
            await asyncio.to_thread(_unlink, path)
            raise
        return file_view(record)

    async def _owned(self, kind: str, pattern: re.Pattern[str], ident: str, owner: str | None) -> dict[str, str] | None:
        """A file's, batch's or job's record if it exists and ``owner`` may see it (None:
        anyone). An id of the wrong shape never reaches a Redis key."""
        if not pattern.match(ident):
            return None
        record: dict[str, str] = await self._r(self.redis.hgetall(PREFIX + kind + ":" + ident))
        if not record or (owner is not None and record.get("owner") != owner):
            return None
        return record

    async def file_record(self, file_id: str, owner: str | None) -> dict[str, str] | None:
        return await self._owned("file", FILE_ID, file_id, owner)

    async def list_files(
        self, owner: str, purpose: str | None, limit: int, after: str | None, desc: bool
    ) -> list[dict[str, Any]]:
        ids = await self._page(PREFIX + "files:" + owner, after, desc)
        out = []
        for file_id in ids:
            record = await self.file_record(file_id, owner)
            if record is None:
                await self._r(self.redis.zrem(PREFIX + "files:" + owner, file_id))  # expired
                continue
            if purpose is None or record.get("purpose") == purpose:
                out.append(file_view(record))
            if len(out) > limit:
                break
        return out

    async def delete_file(self, file_id: str, owner: str) -> bool:
        if await self.file_record(file_id, owner) is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(PREFIX + "file:" + file_id)
        pipe.zrem(PREFIX + "files:" + owner, file_id)
        await self._r(pipe.execute())
        await asyncio.to_thread(_unlink, self.file_path(file_id))
        return True

    async def read_file(self, file_id: str) -> bytes:
        return await asyncio.to_thread(self.file_path(file_id).read_bytes)

    async def _page(self, index: str, after: str | None, desc: bool) -> list[str]:
        """Ids in an index, newest (desc) or oldest first, starting after ``after``."""
        ids: list[str] = await self._r(self.redis.zrevrange(index, 0, -1) if desc else self.redis.zrange(index, 0, -1))
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        return ids

    # --- batches --------------------------------------------------------------------------

    async def create_batch(self, owner: str, fields: dict[str, Any], total: int) -> str:
        batch_id = new_id("batch_")
        now = int(time.time())
        record = {k: _enc(v) for k, v in fields.items()}
        record |= {
            "id": batch_id,
            "owner": owner,
            "status": BatchStatus.VALIDATING.value,
            "created_at": str(now),
            "total": str(total),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(PREFIX + "batch:" + batch_id, mapping=cast(Any, record))
        pipe.zadd(PREFIX + "batches:" + owner, {batch_id: now})
        pipe.zadd(PREFIX + "batches:active", {batch_id: now})
        await self._r(pipe.execute())
        return batch_id

    async def batch(self, batch_id: str, owner: str | None = None) -> dict[str, str] | None:
        record = await self._owned("batch", BATCH_ID, batch_id, owner)
        if record is None:
            return None
        counts = await self._r(self.redis.hgetall(PREFIX + "batch:" + batch_id + ":counts"))
        record["completed"] = counts.get("completed", "0")
        record["failed"] = counts.get("failed", "0")
        return record

    async def list_batches(self, owner: str | None, after: str | None, limit: int) -> list[dict[str, str]]:
        """Newest first; every owner's with owner None (the CLI)."""
        if owner is None:
            keys = [k async for k in self.redis.scan_iter(PREFIX + "batches:*") if k != PREFIX + "batches:active"]
            ids: list[str] = []
            for key in keys:
                ids += await self._page(key, None, True)
        else:
            ids = await self._page(PREFIX + "batches:" + owner, after, True)
        out = []
        for batch_id in ids:
            record = await self.batch(batch_id)
            if record is None:
                if owner is not None:
                    await self._r(self.redis.zrem(PREFIX + "batches:" + owner, batch_id))
                continue
            out.append(record)
            if len(out) > limit:
                break
        if owner is None:
            out.sort(key=lambda r: -int(r.get("created_at", "0")))
        return out

    async def move_batch(self, batch_id: str, target: BatchStatus, **fields: Any) -> bool:
        moved = await self._move_hash(
            PREFIX + "batch:" + batch_id, target, batch_sources(target), BATCH_STAMPS.get(target), fields
        )
        if moved and target in BATCH_FINAL:
            keys = [PREFIX + "batch:" + batch_id + s for s in ("", ":done", ":counts")]
            pipe = self.redis.pipeline(transaction=True)
            for key in keys:
                pipe.expire(key, self.retain_s)
            pipe.zrem(PREFIX + "batches:active", batch_id)
            await self._r(pipe.execute())
        return moved

    async def _move_hash(
        self, key: str, target: Any, sources: Iterable[Any], stamp: str | None, fields: dict[str, Any]
    ) -> bool:
        allowed = [s.value for s in sources]
        args: list[str] = [target.value, stamp or "", str(int(time.time())), str(len(allowed)), *allowed]
        for name, value in fields.items():
            args += [name, _enc(value)]
        return bool(await self._r(self._move(keys=[key], args=args)))

    async def active_batches(self) -> list[str]:
        ids: list[str] = await self._r(self.redis.zrange(PREFIX + "batches:active", 0, -1))
        return ids

    async def done(self, batch_id: str) -> dict[int, Done]:
        raw: dict[str, str] = await self._r(self.redis.hgetall(PREFIX + "batch:" + batch_id + ":done"))
        return {int(k): Done.decode(v) for k, v in raw.items()}

    async def finish_line(self, batch_id: str, index: int, done: Done) -> bool:
        """Record a line as done; False if it already was (its result is then not used)."""
        key = PREFIX + "batch:" + batch_id
        field = "completed" if done.ok else "failed"
        return bool(
            await self._r(self._finish(keys=[key + ":done", key + ":counts"], args=[index, done.encode(), field]))
        )

    def results_dir(self, batch_id: str) -> Path:
        assert BATCH_ID.match(batch_id)
        return self.root / "results" / batch_id

    async def drop_results(self, batch_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.results_dir(batch_id), True)

    # --- async jobs -------------------------------------------------------------------------

    def job_path(self, job_id: str, kind: str) -> Path:
        assert JOB_ID.match(job_id) and kind in ("request", "response")
        return self.root / "jobs" / f"{job_id}.{kind}"

    async def create_job(self, owner: str, fields: dict[str, Any], body: bytes) -> dict[str, str]:
        job_id = new_id("job_")
        path = self.job_path(job_id, "request")
        await asyncio.to_thread(write_durably, path, body)
        now = int(time.time())
        record = {k: _enc(v) for k, v in fields.items()}
        record |= {
            "id": job_id,
            "owner": owner,
            "status": JobStatus.QUEUED.value,
            "created_at": str(now),
            "attempts": "0",
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(PREFIX + "job:" + job_id, mapping=cast(Any, record))
        pipe.zadd(PREFIX + "jobs:active", {job_id: now})
        try:
            await self._r(pipe.execute())
        except StoreUnavailable:
            await asyncio.to_thread(_unlink, path)
            raise
        return record

    async def job(self, job_id: str, owner: str | None = None) -> dict[str, str] | None:
        return await self._owned("job", JOB_ID, job_id, owner)

    async def active_jobs(self) -> list[str]:
        ids: list[str] = await self._r(self.redis.zrange(PREFIX + "jobs:active", 0, -1))
        return ids

    async def move_job(self, job_id: str, target: JobStatus, **fields: Any) -> bool:
        key = PREFIX + "job:" + job_id
        moved = await self._move_hash(key, target, job_sources(target), JOB_STAMPS.get(target), fields)
        if moved and target in JOB_FINAL:
            pipe = self.redis.pipeline(transaction=True)
            pipe.expire(key, self.retain_s)
            pipe.zrem(PREFIX + "jobs:active", job_id)
            await self._r(pipe.execute())
            await asyncio.to_thread(_unlink, self.job_path(job_id, "request"))
        return moved

    async def count_attempt(self, job_id: str) -> int:
        return int(await self._r(self.redis.hincrby(PREFIX + "job:" + job_id, "attempts", 1)))

    # --- the runner's lease -------------------------------------------------------------------

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        return bool(await self._r(self._lease(keys=[PREFIX + "batch:runner"], args=[holder, int(ttl_s * 1000)])))

    async def lease_holder(self) -> str | None:
        holder: str | None = await self._r(self.redis.get(PREFIX + "batch:runner"))
        return holder

    async def drop_lease(self, holder: str) -> bool:
        """End ``holder``'s lease if it still has it."""
        return bool(await self._r(self._drop(keys=[PREFIX + "batch:runner"], args=[holder])))

    async def release_lease(self, holder: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.drop_lease(holder)

    # --- housekeeping ------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Remove what Redis no longer knows from disk (expired files, jobs, results)."""
        removed = 0
        for sub, pattern, key in (
            ("files", FILE_ID, "file:"),
            ("jobs", JOB_ID, "job:"),
            ("results", BATCH_ID, "batch:"),
        ):
            entries = await asyncio.to_thread(_entries, self.root / sub)
            for path in entries:
                ident = path.name.split(".", 1)[0]
                if not pattern.match(ident) or time.time() - _mtime(path) < 3600:
                    continue  # a file being written now has no record yet
                if not await self._r(self.redis.exists(PREFIX + key + ident)):
                    await asyncio.to_thread(shutil.rmtree if path.is_dir() else _unlink, path)
                    removed += 1
        return removed


def file_view(record: dict[str, str]) -> dict[str, Any]:
    """A file as OpenAI's API shows it."""
    expires = record.get("expires_at")
    return {
        "id": record["id"],
        "object": "file",
        "bytes": int(record.get("bytes", "0")),
        "created_at": int(record.get("created_at", "0")),
        "expires_at": int(expires) if expires else None,
        "filename": record.get("filename", ""),
        "purpose": record.get("purpose", ""),
        "status": "processed",
        "status_details": None,
    }


def _enc(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _entries(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def write_durably(path: Path, data: bytes) -> None:
    """Write a whole file so that a crash leaves either no file or all of it."""
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
