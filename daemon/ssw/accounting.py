"""What each request did, counted once it is answered: Prometheus series, a
record for Redis (batched off the hot path by :class:`ssw.redis_sink.RedisSink`)
and one access-log line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .config import Config
from .prom import GatewayMetrics
from .redis_sink import RedisSink, RequestRecord

log = logging.getLogger("ssw.access")


@dataclass(slots=True)
class Exchange:
    """What one request did, for metrics, Redis and the access log."""

    route: str = ""
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    model: str = "unknown"  # never client text: unknown names stay "unknown"
    priority: str = "interactive"
    stream: bool = False
    worker: str = ""
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    strip_usage: bool = False  # ssw asked vLLM for the usage chunk, the client did not
    key: str = ""  # the API key's name
    admitted: bool = False  # counted against its key's in-flight limit

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.prompt_tokens = p if isinstance(p, int) else None
            self.completion_tokens = c if isinstance(c, int) else None


class Accounting:
    def __init__(self, cfg: Config, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.sink = RedisSink(cfg.redis_url, capacity=cfg.gateway.metrics_buffer)
        self.sink.on_drop = lambda n: metrics.dropped.inc(n)
        self.access_log = cfg.gateway.access_log
        self.key_in_flight: dict[str, int] = {}

    def finish(self, ex: Exchange) -> None:
        """Account for one answered request; never raises, never blocks."""
        latency = time.perf_counter() - ex.t0
        m = self.metrics
        m.requests.labels(ex.model, str(ex.status)).inc()
        m.duration.labels(ex.model).observe(latency)
        if ex.ttft_s is not None:
            m.ttft.labels(ex.model).observe(ex.ttft_s)
        if ex.prompt_tokens:
            m.prompt_tokens.labels(ex.model).inc(ex.prompt_tokens)
        if ex.completion_tokens:
            m.completion_tokens.labels(ex.model).inc(ex.completion_tokens)
        ttft_ms = None if ex.ttft_s is None else round(ex.ttft_s * 1000, 2)
        self.sink.record(
            RequestRecord(
                ts=ex.started,
                model=ex.model,
                worker=ex.worker,
                priority=ex.priority,
                status=ex.status,
                latency_ms=round(latency * 1000, 2),
                ttft_ms=ttft_ms,
                prompt_tokens=ex.prompt_tokens,
                completion_tokens=ex.completion_tokens,
                error=ex.error,
                stream=ex.stream,
                key=ex.key,
            )
        )
        if ex.admitted:
            self.key_in_flight[ex.key] -= 1
        if self.access_log:
            log.info(
                "request key=%s model=%s worker=%s status=%d latency_ms=%.1f ttft_ms=%s prompt_tokens=%s "
                "completion_tokens=%s priority=%s stream=%s error=%s",
                ex.key or "-",
                ex.model,
                ex.worker or "-",
                ex.status,
                latency * 1000,
                ttft_ms,
                ex.prompt_tokens,
                ex.completion_tokens,
                ex.priority,
                ex.stream,
                ex.error or "-",
            )
