"""A batch's results: each line's answer appended to this runner's segment, on
disk (fdatasync) before it counts, and recorded in Redis; at the end, the output
and error files collected from the recorded slices in input order, each slice
checked to be its line's whole result. An async job's answer is its own file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ssw.batch.input import Line
from ssw.batch.states import BatchStatus, JobStatus
from ssw.batch.store import BatchStore, Done, write_durably

if TYPE_CHECKING:
    from ssw.batch.backlog import BatchWork

log = logging.getLogger(__name__)


def error_record(code: str, message: str) -> dict[str, Any]:
    """The error object of a request that got no answer (in a result line, or a job's record)."""
    return {"code": code, "message": message}


class Results:
    def __init__(self, store: BatchStore, runner_id: str) -> None:
        self.store = store
        self.runner_id = runner_id

    async def append(self, work: BatchWork, data: bytes, ok: bool) -> Done:
        """Append a result to this runner's segment, on disk before it counts. Its offset
        is the file's own end (this runner may have written here before it last lost the
        lease); a failed write leaves the segment exactly as it was."""
        async with work.write_lock:
            if work.segment is None:
                directory = self.store.results_dir(work.id)
                await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
                work.segment = directory / f"{self.runner_id}.jsonl"
            offset = await asyncio.to_thread(_append_synced, work.segment, data)
        return Done(work.segment.name, offset, len(data), ok)

    async def fail(self, work: BatchWork, code: str, message: str) -> None:
        """End a batch as failed, with the reason in its errors."""
        log.error("batch %s: failed: %s", work.id, message)
        await self.store.move_batch(
            work.id,
            BatchStatus.FAILED,
            errors={"object": "list", "data": [{"code": code, "message": message, "line": None}]},
        )

    async def end_job(
        self, job_id: str, status: JobStatus, response: dict[str, Any] | None, error: dict[str, Any] | None
    ) -> None:
        if response is not None:
            await asyncio.to_thread(write_durably, self.store.job_path(job_id, "response"), orjson.dumps(response))
        fields: dict[str, Any] = {}
        if response is not None:
            fields["response_status"] = str(response["status_code"])
        if error is not None:
            fields["error"] = error
        await self.store.move_job(job_id, status, **fields)

    async def finalize(self, work: BatchWork, final: BatchStatus) -> bool:
        """Write the output and error files from the finished lines, in input order,
        then end the batch; whether it ended (failed or not). Done again from the start if the runner dies halfway: the
        files' ids come from the batch's, so a second pass replaces the first."""
        if work.status is not BatchStatus.FINALIZING:
            if not await self.store.move_batch(work.id, BatchStatus.FINALIZING, final_status=final.value):
                return False
            work.status = BatchStatus.FINALIZING
        done = await self.store.done(work.id)
        fields: dict[str, Any] = {}
        try:
            outputs, errors = await asyncio.to_thread(self.collect, work, done, final)
            for kind, lines in (("output", outputs), ("error", errors)):
                if lines:
                    data = b"".join(lines)
                    record = await self.store.add_file(
                        work.owner,
                        f"{work.id}_{kind}.jsonl",
                        "batch_output",
                        len(data),
                        _writer(data),
                        keep=False,
                        file_id=_derived_id(work.id, kind),
                    )
                    fields[f"{kind}_file_id"] = record["id"]
        except (OSError, ResultsCorrupt) as exc:
            await self.fail(work, "results_unwritable", f"the results could not be collected: {exc}")
            return True
        await self.store.move_batch(work.id, final, **fields)
        await self.store.drop_results(work.id)
        counts = await self.store.batch(work.id)
        log.info(
            "batch %s: %s (%s completed, %s failed of %d)",
            work.id,
            final.value,
            counts and counts.get("completed"),
            counts and counts.get("failed"),
            len(work.lines),
        )
        return True

    def collect(self, work: BatchWork, done: dict[int, Done], final: BatchStatus) -> tuple[list[bytes], list[bytes]]:
        outputs: list[bytes] = []
        errors: list[bytes] = []
        directory = self.store.results_dir(work.id)
        handles: dict[str, Any] = {}
        try:
            for line in work.lines:
                where = done.get(line.index)
                if where is None:
                    if final is BatchStatus.EXPIRED:
                        errors.append(
                            _not_run(line, "batch_expired", "The request was not run before the batch expired.")
                        )
                    continue
                f = handles.get(where.segment)
                if f is None:
                    f = handles[where.segment] = open(directory / where.segment, "rb")  # noqa: SIM115
                f.seek(where.offset)
                data = f.read(where.length)
                _check_result(data, line, where)
                (outputs if where.ok else errors).append(data)
        finally:
            for f in handles.values():
                f.close()
        return outputs, errors


def _not_run(line: Line, code: str, message: str) -> bytes:
    record = {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": line.custom_id,
        "response": None,
        "error": error_record(code, message),
    }
    return orjson.dumps(record) + b"\n"


def _derived_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def _writer(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        write_durably(path, data)

    return write


class ResultsCorrupt(Exception):
    """A recorded result is not the whole JSON line it was recorded as."""


def _check_result(data: bytes, line: Line, where: Done) -> None:
    """Each slice a batch is collected from must be one whole JSON line for its request."""
    try:
        record = orjson.loads(data) if data.endswith(b"\n") and data.count(b"\n") == 1 else None
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("custom_id") != line.custom_id:
        raise ResultsCorrupt(
            f"line {line.index + 1}: bytes {where.offset}-{where.offset + where.length} of {where.segment} "
            "are not its result"
        )


def _append_synced(path: Path, data: bytes) -> int:
    """Append ``data`` durably and return where it starts; on any failure (a short write
    on a full disk) cut the file back to where it was, so that no partial line stays."""
    # Unbuffered: a short write is seen here, not retried by a buffer at close.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
    return start
