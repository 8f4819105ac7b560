"""What there is to do: the batches in progress (their lines not yet done, per
model, in input order) and the queued async jobs, read from the store each tick;
and who gets the next free slots (:func:`fair_share`: one key's 50,000 lines never
starve another key's)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssw.batch.input import Line, read_lines
from ssw.batch.results import error_record
from ssw.batch.states import BATCH_FINAL, BatchStatus, JobStatus
from ssw.batch.store import BatchStore
from ssw.common.serving import Serving
from ssw.config import Config
from ssw.errors import SswError

if TYPE_CHECKING:
    from ssw.batch.results import Results


log = logging.getLogger(__name__)


@dataclass
class Task:
    """One request to run: a batch line or an async job."""

    model: str
    batch: BatchWork | None = None
    line: Line | None = None
    job_id: str = ""
    not_before: float = 0.0
    attempts: int = 0
    taken: bool = False  # a job being run (it stays known until it ends)
    owner: str = ""  # the API key that submitted it: slots are shared fairly between keys


@dataclass
class BatchWork:
    """What the runner holds of one batch in progress."""

    id: str
    owner: str
    endpoint: str
    data: bytes
    lines: list[Line]
    pending: dict[str, deque[Task]] = field(default_factory=dict)  # model -> its lines waiting, in order
    running: int = 0
    status: BatchStatus = BatchStatus.IN_PROGRESS
    expires_at: float = 0.0
    segment: Path | None = None
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Backlog:
    def __init__(self, cfg: Config, gw: Serving, store: BatchStore, results: Results) -> None:
        self.cfg = cfg
        self.settings = cfg.batch
        self.gw = gw
        self.store = store
        self.results = results
        self.batches: dict[str, BatchWork] = {}
        self.jobs: dict[str, Task] = {}  # queued or running jobs this runner knows

    def clear(self) -> None:
        self.batches.clear()
        self.jobs.clear()

    async def refresh_batches(self, now: float) -> None:
        active = await self.store.active_batches()
        for batch_id in list(self.batches):
            if batch_id not in active and self.batches[batch_id].running == 0:
                del self.batches[batch_id]
        for batch_id in active:
            record = await self.store.batch(batch_id)
            if record is None:
                continue
            status = BatchStatus(record["status"])
            work = self.batches.get(batch_id)
            if work is None:
                if status in BATCH_FINAL:
                    continue
                work = await self._open(record)
                if work is None:
                    continue
                self.batches[batch_id] = work
            work.status = status
            if status is BatchStatus.FINALIZING:
                if work.running == 0:
                    await self._finalize(work, BatchStatus(record.get("final_status") or BatchStatus.COMPLETED))
                continue
            if status is BatchStatus.CANCELLING:
                work.pending.clear()
                if work.running == 0:
                    await self._finalize(work, BatchStatus.CANCELLED)
            elif now >= work.expires_at:
                work.pending.clear()
                if work.running == 0:
                    await self._finalize(work, BatchStatus.EXPIRED)
            elif not any(work.pending.values()) and work.running == 0:
                await self._finalize(work, BatchStatus.COMPLETED)

    async def _open(self, record: dict[str, str]) -> BatchWork | None:
        """Pick up a batch: its lines, less those already done (by any runner before)."""
        batch_id = record["id"]
        try:
            data = await self.store.read_file(record["input_file_id"])
            lines = await asyncio.to_thread(
                read_lines,
                data,
                record["endpoint"],
                _asked_model,
                self.settings.max_lines,
                len(data),
                self.cfg.limits.max_json_depth,
            )
        except (OSError, SswError) as exc:
            message = exc.message if isinstance(exc, SswError) else str(exc)
            log.error("batch %s: its input file cannot be read: %s", batch_id, message)
            await self.store.move_batch(
                batch_id,
                BatchStatus.FAILED,
                errors={"object": "list", "data": [{"code": "input_unreadable", "message": message, "line": None}]},
            )
            return None
        if record["status"] == BatchStatus.VALIDATING.value:
            await self.store.move_batch(batch_id, BatchStatus.IN_PROGRESS)
        done = await self.store.done(batch_id)
        work = BatchWork(
            id=batch_id,
            owner=record.get("owner", ""),
            endpoint=record["endpoint"],
            data=data,
            lines=lines,
            expires_at=float(record.get("expires_at", "0") or 0),
        )
        resolve = self.resolver()
        for line in lines:
            if line.index not in done:
                model = resolve(line.model)
                work.pending.setdefault(model, deque()).append(Task(model, work, line, owner=work.owner))
        if done:
            log.info("batch %s: resuming, %d of %d lines already done", batch_id, len(done), len(lines))
        return work

    async def refresh_jobs(self, now: float) -> None:
        for job_id in await self.store.active_jobs():
            if job_id in self.jobs:
                continue
            record = await self.store.job(job_id)
            if record is None or record.get("status") != JobStatus.QUEUED.value:
                continue
            if now >= float(record.get("expires_at", "0") or 0):
                await self.results.end_job(
                    job_id, JobStatus.EXPIRED, None, error_record("job_expired", "the job expired before it ran")
                )
                continue
            model = self.resolver()(record.get("model", ""))
            self.jobs[job_id] = Task(
                model, job_id=job_id, attempts=int(record.get("attempts", "0")), owner=record.get("owner", "")
            )

    def resolver(self) -> Any:
        names = self.gw.snapshot and self.gw.names

        def resolve(name: str) -> str:
            if not names:
                return name
            try:
                return names.resolve(name)
            except SswError:
                return name

        return resolve

    def pending(self) -> dict[str, list[deque[Task]]]:
        """Model -> the queues of what waits to run on it: per API key, its async jobs
        first (one request, someone waiting on it), then its batches' lines, the oldest
        batch first (the runner shares the slots between keys). Nothing is copied: a
        batch's 50,000 lines cost nothing here."""
        out: dict[str, list[deque[Task]]] = {}
        jobs: dict[tuple[str, str], deque[Task]] = {}
        for task in self.jobs.values():
            if not task.taken:
                jobs.setdefault((task.model, task.owner), deque()).append(task)
        for (model, _), queue in jobs.items():
            out.setdefault(model, []).append(queue)
        for work in self.batches.values():
            if work.status is BatchStatus.IN_PROGRESS:
                for model, queue in work.pending.items():
                    if queue:
                        out.setdefault(model, []).append(queue)
        return out

    def requeue(self, task: Task, delay: float) -> None:
        task.not_before = time.time() + delay
        if task.batch is not None:
            task.batch.pending.setdefault(task.model, deque()).appendleft(task)
        else:
            self.jobs.pop(task.job_id, None)  # read again from the store, queued

    async def _finalize(self, work: BatchWork, final: BatchStatus) -> None:
        if await self.results.finalize(work, final):
            self.batches.pop(work.id, None)

    async def fail_batch(self, work: BatchWork, code: str, message: str) -> None:
        """End a batch as failed, with the reason in its errors (once, whichever line saw it first)."""
        if self.batches.pop(work.id, None) is not None:
            await self.results.fail(work, code, message)

    async def end_job(
        self, job_id: str, status: JobStatus, response: dict[str, Any] | None, error: dict[str, Any] | None
    ) -> None:
        await self.results.end_job(job_id, status, response, error)
        self.jobs.pop(job_id, None)


def fair_share(queues: list[deque[Task]], slots: int, now: float, running: Counter[str]) -> list[Task]:
    """Up to ``slots`` tasks to start now, taken from the front of ``queues`` (each one
    key's, in the order that key is served), one at a time for the key with the fewest
    running (its earliest queue first): one key's 50,000 lines or thousand async jobs
    never starve another key's. Pops what it returns."""
    by_owner: dict[str, list[deque[Task]]] = {}
    for queue in queues:
        if queue:
            by_owner.setdefault(queue[0].owner, []).append(queue)
    taken: Counter[str] = Counter()
    out: list[Task] = []
    while len(out) < slots:
        ready = [o for o, qs in by_owner.items() if any(q and q[0].not_before <= now for q in qs)]
        if not ready:
            break
        owner = min(ready, key=lambda o: (running[o] + taken[o], o))
        queue = next(q for q in by_owner[owner] if q and q[0].not_before <= now)
        out.append(queue.popleft())
        taken[owner] += 1
    return out


def _asked_model(body: dict[str, object]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""
