"""What each request did, counted once it is answered: Prometheus series, a
record for Redis and one access-log line.

None of it happens on the request's path. ``finish`` only queues the
exchange; every FLUSH_INTERVAL_S one task folds the batch into the series,
hands the records to the Redis sink (which writes them in one pipelined
round trip) and writes every access-log line in one write, as nginx's
buffered access_log does. A scrape of /metrics flushes first, so the series
are always current. Per request this costs a list append instead of a log
record and a dozen locked metric updates (bench/README.md: the profile).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ssw.common import tasks
from ssw.common.redis_sink import RedisSink, RequestRecord
from ssw.config import Config
from ssw.gateway.board.series import Series
from ssw.gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("ssw.access")
FLUSH_INTERVAL_S = 0.1
SLICE = 256  # records handled between two turns of the event loop: no stall of requests


@dataclass(slots=True)
class Exchange:
    """What one request did, for metrics, Redis and the access log."""

    route: str = ""
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    latency_s: float = 0.0
    model: str = "unknown"  # never client text: unknown names stay "unknown"
    priority: str = "interactive"
    stream: bool = False
    worker: str = ""
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    waited_s: float = 0.0  # held for its model's load or wake
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    strip_usage: bool = False  # ssw asked vLLM for the usage chunk, the client did not
    key: str = ""  # the API key's name
    admitted: bool = False  # counted against its key's in-flight limit
    capture_id: bool = False  # a stored Response: its id is noted with its worker
    response_id: str | None = None
    # For its trace (tracing on): its root span, the context sent on, and when it was
    # admitted, began to wait, was sent to a worker (perf_counter); the worker's load marks.
    span: Span | None = None
    traceparent: bytes | None = None
    admitted_at: float = 0.0
    wait_from: float | None = None
    sent_at: float | None = None
    load_marks: dict[str, float] | None = None

    def usage(self, usage: object) -> None:
        """Token counts as OpenAI's APIs name them, or as the Responses and Anthropic
        APIs do; a partial report (an Anthropic stream's last event) keeps the rest."""
        if isinstance(usage, dict):
            p = usage.get("prompt_tokens", usage.get("input_tokens"))
            c = usage.get("completion_tokens", usage.get("output_tokens"))
            if isinstance(p, int):
                self.prompt_tokens = p
            if isinstance(c, int):
                self.completion_tokens = c


class Accounting:
    def __init__(self, cfg: Config, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.sink = RedisSink(cfg.redis_url, capacity=cfg.gateway.metrics_buffer)
        self.sink.on_drop = lambda n: metrics.dropped.inc(n)
        self.access_log = cfg.gateway.access_log
        self._pending: list[Exchange] = []
        self._task: asyncio.Task[None] | None = None
        # journald stamps its lines itself; elsewhere each line carries its time.
        self._journal = bool(os.environ.get("JOURNAL_STREAM"))
        self.series: Series | None = None  # the status page's charts, when the app has the page
        self.on_traced: Callable[[Exchange], None] | None = None  # writes a traced request's spans
        metrics.before_scrape = self.flush

    def start(self) -> None:
        self.sink.start()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await tasks.cancel(self._task)
        self.flush()
        await self.sink.close()

    def finish(self, ex: Exchange) -> None:
        """Account for one answered request: queued, never blocks, never raises."""
        ex.latency_s = time.perf_counter() - ex.t0
        self._pending.append(ex)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            while self._pending:
                self._flush(SLICE)
                await asyncio.sleep(0)  # let requests run between slices

    def flush(self) -> None:
        """Everything queued, now (a scrape, shutdown)."""
        self._flush(len(self._pending))

    def _flush(self, limit: int) -> None:
        batch, self._pending = self._pending[:limit], self._pending[limit:]
        if not batch:
            return
        try:
            self._count(batch)
            for ex in batch:
                self.sink.record(_record(ex))
                if ex.span is not None and self.on_traced is not None:
                    self.on_traced(ex)
            if self.access_log and log.isEnabledFor(logging.INFO):
                self._write_access_log(batch)
        except Exception:  # accounting must never take the gateway down
            log.exception("accounting failed for %d requests", len(batch))

    def _count(self, batch: list[Exchange]) -> None:
        m = self.metrics
        answered: Counter[tuple[str, str, str]] = Counter()
        prompt: Counter[str] = Counter()
        completion: Counter[str] = Counter()
        now = time.time()
        for ex in batch:
            answered[(ex.model, str(ex.status), ex.route)] += 1
            if self.series is not None:
                self.series.add(ex.model, ex.priority, ex.latency_s, ex.status >= 400 or bool(ex.error), now)
            m.duration.labels(ex.model, ex.priority).observe(ex.latency_s)
            if ex.ttft_s is not None:
                m.ttft.labels(ex.model, ex.priority).observe(ex.ttft_s)
            if ex.waited_s > 0:
                m.load_wait.labels(ex.model, ex.priority).observe(ex.waited_s)
            if ex.prompt_tokens:
                prompt[ex.model] += ex.prompt_tokens
            if ex.completion_tokens:
                completion[ex.model] += ex.completion_tokens
        for (model, status, route), n in answered.items():
            m.requests.labels(model, status, route).inc(n)
        for model, n in prompt.items():
            m.prompt_tokens.labels(model).inc(n)
        for model, n in completion.items():
            m.completion_tokens.labels(model).inc(n)

    def _write_access_log(self, batch: list[Exchange]) -> None:
        lines = []
        for ex in batch:
            prefix = "" if self._journal else time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(ex.started))
            ttft = "None" if ex.ttft_s is None else f"{ex.ttft_s * 1000:.2f}"
            lines.append(
                f"{prefix}INFO ssw.access: request key={ex.key or '-'} model={ex.model} worker={ex.worker or '-'} "
                f"status={ex.status} latency_ms={ex.latency_s * 1000:.1f} ttft_ms={ttft} "
                f"prompt_tokens={ex.prompt_tokens} completion_tokens={ex.completion_tokens} "
                f"priority={ex.priority} stream={ex.stream} route={ex.route} error={ex.error or '-'}\n"
            )
        data = memoryview("".join(lines).encode())
        stream = sys.stderr
        try:
            stream.flush()  # whatever logging wrote before stays before
            fd = stream.fileno()
            while data:
                data = data[os.write(fd, data) :]
        except (OSError, ValueError):
            pass  # stderr gone: nothing to tell


def _record(ex: Exchange) -> RequestRecord:
    return RequestRecord(
        ts=ex.started,
        model=ex.model,
        worker=ex.worker,
        priority=ex.priority,
        status=ex.status,
        latency_ms=round(ex.latency_s * 1000, 2),
        ttft_ms=None if ex.ttft_s is None else round(ex.ttft_s * 1000, 2),
        prompt_tokens=ex.prompt_tokens,
        completion_tokens=ex.completion_tokens,
        error=ex.error,
        stream=ex.stream,
        key=ex.key,
        route=ex.route,
    )
