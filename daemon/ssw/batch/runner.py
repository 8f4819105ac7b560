"""The batch runner: works off batch lines and async jobs in the background,
through the gateway's own request path at ``batch`` priority.

One gateway process on the host runs it at a time: it holds a lease in Redis
(renewed every tick), so with several gateway processes, or a gateway that was
SIGKILLed and restarted, exactly one runner works and the next takes over
within the lease's TTL. Whatever it was running then is simply run again: a
line counts as finished only once its result is on disk and recorded in Redis
(:mod:`ssw.batch.store`), so no finished line is ever run or written twice.

Each tick it asks :func:`ssw.batch.policy.decide`, per model, whether to start
lines, ask for a load that evicts no model in interactive use, or wait
(interactive requests queued at the model's workers: batch yields).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ssw.batch.input import Line, line_body, read_lines
from ssw.batch.metrics import BatchMetrics
from ssw.batch.policy import Act, ModelState, View, decide
from ssw.batch.states import BATCH_FINAL, BatchStatus, JobStatus
from ssw.batch.store import BatchStore, Done, StoreUnavailable, write_durably
from ssw.common.probes import Probes
from ssw.common.routes import match
from ssw.common.serving import Answer, Serving
from ssw.common.states import LoadState
from ssw.config import Config
from ssw.errors import LoaderUnavailable, ModelNotFound, SswError, WouldEvict

log = logging.getLogger(__name__)
TICK_S = 0.5
LEASE_TTL_S = 10.0
REFUSED_RETRY_S = 15.0  # a protected load was refused: ask again after this
RETRY_DELAY_S = 1.0  # a line the gateway could not serve yet (model loading, worker gone)
SWEEP_EVERY_S = 3600.0
# Answers that say "not now" rather than "never": the line is run again later.
SSW_RETRYABLE = {408, 429, 502, 503, 504}


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


class Runner:
    def __init__(self, cfg: Config, gw: Serving, store: BatchStore, metrics: BatchMetrics) -> None:
        self.cfg = cfg
        self.settings = cfg.batch
        self.gw = gw
        self.store = store
        self.metrics = metrics
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.holding = False
        self.batches: dict[str, BatchWork] = {}
        self.jobs: dict[str, Task] = {}  # queued or running jobs this runner knows
        self.running: dict[str, int] = {}  # model -> its lines and jobs in flight
        self.running_by_owner: Counter[str] = Counter()  # API key -> its lines and jobs in flight
        self.queued: dict[str, int] = {}  # model -> requests queued at its workers (vLLM)
        self.refused_until: dict[str, float] = {}
        self._asking: set[str] = set()
        self._refused: set[str] = set()  # models whose batch load was refused (logged once)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._probes = Probes(cfg.health.probe_timeout_s, cfg.health.probe_timeout_s)
        self._last_sweep = 0.0
        self._last_warning = ""
        self._published: set[str] = set()  # models with batch gauges

    def start(self) -> None:
        self._main = [asyncio.create_task(self._run()), asyncio.create_task(self._watch_queues())]

    async def close(self) -> None:
        for task in [*self._main, *self._tasks]:
            task.cancel()
        for task in [*self._main, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.holding:
            await self.store.release_lease(self.id)
        await self._probes.close()

    def poke(self) -> None:
        """New work was submitted (in this process): look now, not at the next tick."""
        self._wake.set()

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if await self.store.hold_lease(self.id, LEASE_TTL_S):
                    if not self.holding:
                        self.holding = True
                        log.info("batch runner %s: running batches and async jobs", self.id)
                        await self._take_over()
                    await self._tick()
                elif not self.holding and await self._holder_died():
                    continue  # taken over at once: the next turn holds the lease
                elif self.holding:
                    log.warning("batch runner %s: lost the lease; another process runs the work now", self.id)
                    self._let_go()
                self._last_warning = ""
            except StoreUnavailable as exc:
                if self._last_warning != exc.message:
                    log.warning("batch runner: %s", exc.message)
                    self._last_warning = exc.message
                if self.holding:
                    self._let_go()  # the lease cannot be renewed: another process may take over
            except Exception:
                log.exception("batch runner: tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()

    async def _holder_died(self) -> bool:
        """Free the lease of a runner on this host whose process is gone (a gateway
        SIGKILLed and restarted takes over at once, not after the lease's TTL)."""
        holder = await self.store.lease_holder()
        if holder is None:
            return False
        parts = holder.rsplit("-", 2)  # host-pid-nonce
        if len(parts) != 3 or not parts[1].isdigit() or parts[0] != socket.gethostname():
            return False
        pid = int(parts[1])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            pass
        except PermissionError:
            return False  # alive, as another account
        if await self.store.drop_lease(holder):
            log.info("batch runner: the previous runner (pid %d) is gone; taking over", pid)
            return True
        return False

    def _let_go(self) -> None:
        self.holding = False
        for task in self._tasks:
            task.cancel()
        self.batches.clear()
        self.jobs.clear()
        self.running.clear()

    async def _take_over(self) -> None:
        """Jobs a previous runner had running were cut short: they wait again."""
        for job_id in await self.store.active_jobs():
            record = await self.store.job(job_id)
            if record is not None and record.get("status") == JobStatus.RUNNING.value:
                await self.store.move_job(job_id, JobStatus.QUEUED)

    async def _tick(self) -> None:
        now = time.time()
        await self._refresh_batches(now)
        await self._refresh_jobs(now)
        self._dispatch(now)
        self._publish()
        if now - self._last_sweep > SWEEP_EVERY_S:
            self._last_sweep = now
            removed = await self.store.sweep()
            if removed:
                log.info("batch runner: removed %d expired files and results from disk", removed)

    # --- what there is to do -----------------------------------------------------------------

    async def _refresh_batches(self, now: float) -> None:
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
        resolve = self._resolver()
        for line in lines:
            if line.index not in done:
                model = resolve(line.model)
                work.pending.setdefault(model, deque()).append(Task(model, work, line, owner=work.owner))
        if done:
            log.info("batch %s: resuming, %d of %d lines already done", batch_id, len(done), len(lines))
        return work

    async def _refresh_jobs(self, now: float) -> None:
        for job_id in await self.store.active_jobs():
            if job_id in self.jobs:
                continue
            record = await self.store.job(job_id)
            if record is None or record.get("status") != JobStatus.QUEUED.value:
                continue
            if now >= float(record.get("expires_at", "0") or 0):
                await self._end_job(
                    job_id, JobStatus.EXPIRED, None, _error("job_expired", "the job expired before it ran")
                )
                continue
            model = self._resolver()(record.get("model", ""))
            self.jobs[job_id] = Task(
                model, job_id=job_id, attempts=int(record.get("attempts", "0")), owner=record.get("owner", "")
            )

    def _resolver(self) -> Any:
        names = self.gw.snapshot and self.gw.names

        def resolve(name: str) -> str:
            if not names:
                return name
            try:
                return names.resolve(name)
            except SswError:
                return name

        return resolve

    def _pending(self) -> dict[str, list[deque[Task]]]:
        """Model -> the queues of what waits to run on it: per API key, its async jobs
        first (one request, someone waiting on it), then its batches' lines, the oldest
        batch first (_dispatch shares the slots between keys). Nothing is copied: a
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

    # --- running --------------------------------------------------------------------------

    def _model_state(self, model: str) -> ModelState:
        snap = self.gw.snapshot
        if snap is None:
            return ModelState.LOADING
        names = self.gw.names
        if model in names.ready or model in names.remote:
            return ModelState.READY  # here, or (a fleet) on another host
        entry = snap.models.get(model)
        if entry is None:
            # Another host's model (a fleet) that is ready nowhere: its lines wait for it.
            return ModelState.LOADING if model in names.models else ModelState.GONE
        if entry.load.state is LoadState.COOLING_DOWN:
            return ModelState.FAILING
        if entry.load.state in (LoadState.LOADING, LoadState.BACKING_OFF) or model in names.live:
            return ModelState.LOADING
        return ModelState.IDLE

    def _dispatch(self, now: float) -> None:
        for model, queues in self._pending().items():
            # A line put back (its model was not ready) waits at the front of its queue.
            ready = [q for q in queues if q[0].not_before <= now]
            view = View(
                state=self._model_state(model),
                pending=sum(len(q) for q in ready),
                running=self.running.get(model, 0),
                interactive_queued=self.queued.get(model, 0) + self.gw.interactive_queued(model),
                refused_until=self.refused_until.get(model, 0.0),
                now=now,
            )
            decision = decide(view, self.settings.concurrency_per_model)
            if decision.act is Act.RUN:
                for task in fair_share(ready, decision.count, now, self.running_by_owner):
                    self._start(task)
            elif decision.act is Act.LOAD and model not in self._asking:
                self._asking.add(model)
                self._spawn(self._ask_load(model))
            elif decision.act is Act.FAIL:
                for queue in ready:
                    while queue:
                        self._start(queue.popleft(), failure=ModelNotFound(model, []))

    def _start(self, task: Task, failure: SswError | None = None) -> None:
        if task.batch is not None:
            task.batch.running += 1
        else:
            task.taken = True
        self.running[task.model] = self.running.get(task.model, 0) + 1
        self.running_by_owner[task.owner] += 1
        self._spawn(self._run_task(task, failure))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_load(self, model: str) -> None:
        try:
            await self.gw.request_load(model, protect_s=self.settings.protect_interactive_s)
            log.info("batch runner: loading %s for batch work", model)
            self._refused.discard(model)
        except WouldEvict as exc:
            if model not in self._refused:
                self._refused.add(model)
                log.info("batch runner: %s waits: %s", model, exc.message)
            # Asked again well before the protection can have run out.
            retry = min(REFUSED_RETRY_S, max(1.0, self.settings.protect_interactive_s / 4))
            self.refused_until[model] = time.time() + retry
        except (LoaderUnavailable, SswError) as exc:
            log.warning("batch runner: cannot load %s now: %s", model, exc.message)
            self.refused_until[model] = time.time() + REFUSED_RETRY_S
        finally:
            self._asking.discard(model)

    async def _run_task(self, task: Task, failure: SswError | None) -> None:
        try:
            if task.batch is not None and task.line is not None:
                await self._run_line(task, task.batch, task.line, failure)
            else:
                await self._run_job(task, failure)
        except StoreUnavailable as exc:
            log.warning("batch runner: %s; the request will run again", exc.message)
            self._requeue(task, RETRY_DELAY_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch runner: a request failed unexpectedly; it will run again")
            self._requeue(task, RETRY_DELAY_S)
        finally:
            self.running[task.model] -= 1
            self.running_by_owner[task.owner] -= 1
            if task.batch is not None:
                task.batch.running -= 1
            self._wake.set()

    def _requeue(self, task: Task, delay: float) -> None:
        task.not_before = time.time() + delay
        if task.batch is not None:
            task.batch.pending.setdefault(task.model, deque()).appendleft(task)
        else:
            self.jobs.pop(task.job_id, None)  # read again from the store, queued

    async def _call(self, task: Task, owner: str, route_path: str, body: bytes) -> Answer | None:
        """The answer, or None when the request should run again later."""
        found = match("POST", route_path)
        assert found is not None
        if self.cfg.auth.enabled:
            # As of the key file's last reload (the gateway re-reads it: SIGHUP, or when it changes).
            key = self.gw.key_named(owner)
            if key is None:
                return _answer(401, "invalid_api_key", "the API key that submitted this request was revoked")
        else:
            key = None
        answer = await self.gw.execute(key, found[0], body)
        if 200 <= answer.status < 300:
            return answer
        source = _source(answer)
        if source != "worker" and answer.status in SSW_RETRYABLE:
            return None  # not ready, no room, worker gone: later
        if answer.status >= 500:
            task.attempts += 1
            if task.attempts < self.settings.max_attempts:
                log.warning(
                    "batch runner: %s answered %d; try %d of %d",
                    task.model,
                    answer.status,
                    task.attempts,
                    self.settings.max_attempts,
                )
                return None
        return answer

    async def _run_line(self, task: Task, work: BatchWork, line: Line, failure: SswError | None) -> None:
        if failure is not None:
            answer: Answer | None = _answer(failure.status, failure.code or failure.type, failure.message)
        else:
            body = orjson.dumps(line_body(work.data, line))
            answer = await self._call(task, work.owner, work.endpoint, body)
        if answer is None:
            self._requeue(task, RETRY_DELAY_S)
            return
        ok = 200 <= answer.status < 300
        result = {
            "id": "batch_req_" + secrets.token_hex(12),
            "custom_id": line.custom_id,
            "response": {"status_code": answer.status, "request_id": _request_id(answer), "body": _json(answer.body)},
            "error": None,
        }
        try:
            done = await self._append(work, orjson.dumps(result) + b"\n", ok)
        except OSError as exc:
            # Disk full, quota, I/O error: the segment is as it was, and this batch's
            # results cannot be kept; it fails, never completes with lines missing.
            await self._fail_batch(work, "results_unwritable", f"a result could not be written: {exc}")
            return
        if await self.store.finish_line(work.id, line.index, done):
            self.metrics.lines.labels(task.model, "completed" if ok else "failed").inc()

    async def _append(self, work: BatchWork, data: bytes, ok: bool) -> Done:
        """Append a result to this runner's segment, on disk before it counts. Its offset
        is the file's own end (this runner may have written here before it last lost the
        lease); a failed write leaves the segment exactly as it was."""
        async with work.write_lock:
            if work.segment is None:
                directory = self.store.results_dir(work.id)
                await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
                work.segment = directory / f"{self.id}.jsonl"
            offset = await asyncio.to_thread(_append_synced, work.segment, data)
        return Done(work.segment.name, offset, len(data), ok)

    async def _fail_batch(self, work: BatchWork, code: str, message: str) -> None:
        """End a batch as failed, with the reason in its errors (once, whichever line saw it first)."""
        if self.batches.pop(work.id, None) is None:
            return
        log.error("batch %s: failed: %s", work.id, message)
        await self.store.move_batch(
            work.id,
            BatchStatus.FAILED,
            errors={"object": "list", "data": [{"code": code, "message": message, "line": None}]},
        )

    async def _run_job(self, task: Task, failure: SswError | None) -> None:
        job_id = task.job_id
        record = await self.store.job(job_id)
        if record is None or not await self.store.move_job(job_id, JobStatus.RUNNING):
            self.jobs.pop(job_id, None)
            return
        await self.store.count_attempt(job_id)
        if failure is not None:
            answer: Answer | None = _answer(failure.status, failure.code or failure.type, failure.message)
        else:
            body = await asyncio.to_thread(self.store.job_path(job_id, "request").read_bytes)
            answer = await self._call(task, record.get("owner", ""), record["endpoint"], body)
        if answer is None:
            await self.store.move_job(job_id, JobStatus.QUEUED)
            self._requeue(task, RETRY_DELAY_S)
            return
        ok = 200 <= answer.status < 300
        response = {"status_code": answer.status, "request_id": _request_id(answer), "body": _json(answer.body)}
        await self._end_job(job_id, JobStatus.SUCCEEDED if ok else JobStatus.FAILED, response, None)
        self.metrics.lines.labels(task.model, "completed" if ok else "failed").inc()

    async def _end_job(
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
        self.jobs.pop(job_id, None)

    # --- the end of a batch --------------------------------------------------------------------

    async def _finalize(self, work: BatchWork, final: BatchStatus) -> None:
        """Write the output and error files from the finished lines, in input order,
        then end the batch. Done again from the start if the runner dies halfway: the
        files' ids come from the batch's, so a second pass replaces the first."""
        if work.status is not BatchStatus.FINALIZING:
            if not await self.store.move_batch(work.id, BatchStatus.FINALIZING, final_status=final.value):
                return
            work.status = BatchStatus.FINALIZING
        done = await self.store.done(work.id)
        fields: dict[str, Any] = {}
        try:
            outputs, errors = await asyncio.to_thread(self._collect, work, done, final)
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
            await self._fail_batch(work, "results_unwritable", f"the results could not be collected: {exc}")
            return
        await self.store.move_batch(work.id, final, **fields)
        await self.store.drop_results(work.id)
        self.batches.pop(work.id, None)
        counts = await self.store.batch(work.id)
        log.info(
            "batch %s: %s (%s completed, %s failed of %d)",
            work.id,
            final.value,
            counts and counts.get("completed"),
            counts and counts.get("failed"),
            len(work.lines),
        )

    def _collect(self, work: BatchWork, done: dict[int, Done], final: BatchStatus) -> tuple[list[bytes], list[bytes]]:
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

    # --- yielding to interactive traffic -----------------------------------------------------------

    async def _watch_queues(self) -> None:
        """How many requests queue at the workers of each model the runner uses."""
        while True:
            await asyncio.sleep(self.settings.yield_check_s)
            if not self.holding:
                continue
            busy = {m for m, n in self.running.items() if n} | set(self._pending())
            names = self.gw.snapshot and self.gw.names
            queued: dict[str, int] = {}
            for model in busy:
                workers = names.ready.get(model, []) if names else []
                counts = await asyncio.gather(*(self._probes.waiting(Path(w.socket)) for w in workers))
                queued[model] = sum(n or 0 for n in counts)
                if queued[model] and not self.queued.get(model):
                    self.metrics.yields.labels(model).inc()
                    log.info("batch runner: %s has %d queued requests; batch lines wait", model, queued[model])
            self.queued = queued

    def _publish(self) -> None:
        pending = self._pending()
        for model in set(pending) | set(self.running) | self._published:
            self.metrics.queued.labels(model).set(sum(len(q) for q in pending.get(model, ())))
            self.metrics.running.labels(model).set(self.running.get(model, 0))
        self._published = set(pending) | set(self.running)


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


def _answer(status: int, code: str, message: str) -> Answer:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return Answer(status, [(b"content-type", b"application/json")], orjson.dumps(body))


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode(errors="replace")


def _source(answer: Answer) -> str:
    body = _json(answer.body)
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("source", "")) if isinstance(err, dict) else ""


def _request_id(answer: Answer) -> str:
    body = _json(answer.body)
    rid = body.get("id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else "req_" + secrets.token_hex(12)


def _not_run(line: Line, code: str, message: str) -> bytes:
    record = {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": line.custom_id,
        "response": None,
        "error": _error(code, message),
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
