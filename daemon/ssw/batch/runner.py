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
import logging
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from ssw.batch.backlog import Backlog, BatchWork, Task, fair_share
from ssw.batch.input import Line, line_body
from ssw.batch.lease import Lease
from ssw.batch.metrics import BatchMetrics
from ssw.batch.policy import Act, ModelState, View, decide
from ssw.batch.results import Results
from ssw.batch.states import JobStatus
from ssw.batch.store import BatchStore, StoreUnavailable
from ssw.common.probes import Probes
from ssw.common.routes import match
from ssw.common.serving import Answer, Serving
from ssw.common.states import LoadState
from ssw.config import Config
from ssw.errors import LoaderUnavailable, ModelNotFound, SswError, WouldEvict

log = logging.getLogger(__name__)
TICK_S = 0.5
REFUSED_RETRY_S = 15.0  # a protected load was refused: ask again after this
RETRY_DELAY_S = 1.0  # a line the gateway could not serve yet (model loading, worker gone)
SWEEP_EVERY_S = 3600.0
# Answers that say "not now" rather than "never": the line is run again later.
SSW_RETRYABLE = {408, 429, 502, 503, 504}


class Runner:
    def __init__(self, cfg: Config, gw: Serving, store: BatchStore, metrics: BatchMetrics) -> None:
        self.cfg = cfg
        self.settings = cfg.batch
        self.gw = gw
        self.store = store
        self.metrics = metrics
        self.lease = Lease(store)
        self.results = Results(store, self.lease.id)
        self.backlog = Backlog(cfg, gw, store, self.results)
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
        await self.lease.release()
        await self._probes.close()

    def poke(self) -> None:
        """New work was submitted (in this process): look now, not at the next tick."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                if await self.lease.hold():
                    if not self.lease.holding:
                        self.lease.holding = True
                        log.info("batch runner %s: running batches and async jobs", self.lease.id)
                        await self._take_over()
                    await self._tick()
                elif not self.lease.holding and await self.lease.holder_died():
                    continue  # taken over at once: the next turn holds the lease
                elif self.lease.holding:
                    log.warning("batch runner %s: lost the lease; another process runs the work now", self.lease.id)
                    self._let_go()
                self._last_warning = ""
            except StoreUnavailable as exc:
                if self._last_warning != exc.message:
                    log.warning("batch runner: %s", exc.message)
                    self._last_warning = exc.message
                if self.lease.holding:
                    self._let_go()  # the lease cannot be renewed: another process may take over
            except Exception:
                log.exception("batch runner: tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()

    def _let_go(self) -> None:
        self.lease.holding = False
        for task in self._tasks:
            task.cancel()
        self.backlog.clear()
        self.running.clear()

    async def _take_over(self) -> None:
        """Jobs a previous runner had running were cut short: they wait again."""
        for job_id in await self.store.active_jobs():
            record = await self.store.job(job_id)
            if record is not None and record.get("status") == JobStatus.RUNNING.value:
                await self.store.move_job(job_id, JobStatus.QUEUED)

    async def _tick(self) -> None:
        now = time.time()
        await self.backlog.refresh_batches(now)
        await self.backlog.refresh_jobs(now)
        self._dispatch(now)
        self._publish()
        if now - self._last_sweep > SWEEP_EVERY_S:
            self._last_sweep = now
            removed = await self.store.sweep()
            if removed:
                log.info("batch runner: removed %d expired files and results from disk", removed)

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
        for model, queues in self.backlog.pending().items():
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
            self.backlog.requeue(task, RETRY_DELAY_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch runner: a request failed unexpectedly; it will run again")
            self.backlog.requeue(task, RETRY_DELAY_S)
        finally:
            self.running[task.model] -= 1
            self.running_by_owner[task.owner] -= 1
            if task.batch is not None:
                task.batch.running -= 1
            self._wake.set()

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
            self.backlog.requeue(task, RETRY_DELAY_S)
            return
        ok = 200 <= answer.status < 300
        result = {
            "id": "batch_req_" + secrets.token_hex(12),
            "custom_id": line.custom_id,
            "response": {"status_code": answer.status, "request_id": _request_id(answer), "body": _json(answer.body)},
            "error": None,
        }
        try:
            done = await self.results.append(work, orjson.dumps(result) + b"\n", ok)
        except OSError as exc:
            # Disk full, quota, I/O error: the segment is as it was, and this batch's
            # results cannot be kept; it fails, never completes with lines missing.
            await self.backlog.fail_batch(work, "results_unwritable", f"a result could not be written: {exc}")
            return
        if await self.store.finish_line(work.id, line.index, done):
            self.metrics.lines.labels(task.model, "completed" if ok else "failed").inc()

    async def _run_job(self, task: Task, failure: SswError | None) -> None:
        job_id = task.job_id
        record = await self.store.job(job_id)
        if record is None or not await self.store.move_job(job_id, JobStatus.RUNNING):
            self.backlog.jobs.pop(job_id, None)
            return
        await self.store.count_attempt(job_id)
        if failure is not None:
            answer: Answer | None = _answer(failure.status, failure.code or failure.type, failure.message)
        else:
            body = await asyncio.to_thread(self.store.job_path(job_id, "request").read_bytes)
            answer = await self._call(task, record.get("owner", ""), record["endpoint"], body)
        if answer is None:
            await self.store.move_job(job_id, JobStatus.QUEUED)
            self.backlog.requeue(task, RETRY_DELAY_S)
            return
        ok = 200 <= answer.status < 300
        response = {"status_code": answer.status, "request_id": _request_id(answer), "body": _json(answer.body)}
        await self.backlog.end_job(job_id, JobStatus.SUCCEEDED if ok else JobStatus.FAILED, response, None)
        self.metrics.lines.labels(task.model, "completed" if ok else "failed").inc()

    async def _watch_queues(self) -> None:
        """How many requests queue at the workers of each model the runner uses."""
        while True:
            await asyncio.sleep(self.settings.yield_check_s)
            if not self.lease.holding:
                continue
            busy = {m for m, n in self.running.items() if n} | set(self.backlog.pending())
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
        pending = self.backlog.pending()
        for model in set(pending) | set(self.running) | self._published:
            self.metrics.queued.labels(model).set(sum(len(q) for q in pending.get(model, ())))
            self.metrics.running.labels(model).set(self.running.get(model, 0))
        self._published = set(pending) | set(self.running)


def _answer(status: int, code: str, message: str) -> Answer:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return Answer(status, [(b"content-type", b"application/json")], orjson.dumps(body))


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
