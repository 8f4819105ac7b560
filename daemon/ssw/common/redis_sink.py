"""Request records and GPU samples into Redis, off the request path.

Requests only append to a bounded in-memory buffer; a background task writes
batches with one pipelined round trip. When Redis is down or slow, records are
dropped (counted, with a log line at most every 30 s) and requests are served
exactly as fast; writing resumes by itself when Redis answers again.

Keys (all under the prefix, default ``ssw:``):
- ``ssw:requests`` — a stream of raw request records, each entry one field
  ``r`` holding the record as JSON (capped at ~100k entries); its IDs are
  millisecond timestamps, so a time window is one XRANGE.
- ``ssw:minute:<model>:<YYYYmmddHHMM>`` — a hash of per-minute counters
  (requests, errors, prompt_tokens, completion_tokens, latency_ms_sum), kept 7 days.
- ``ssw:gpu:<index>`` — a stream of GPU samples (capped at ~720 entries).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ssw.common import tasks

log = logging.getLogger(__name__)

REQUESTS_KEY = "requests"
STREAM_MAXLEN = 100_000
GPU_MAXLEN = 720
MINUTE_TTL_S = 7 * 24 * 3600
FLUSH_INTERVAL_S = 0.5
BATCH = 500
LOG_EVERY_S = 30.0


@dataclass(frozen=True, slots=True)
class RequestRecord:
    ts: float  # wall time the request arrived
    model: str
    worker: str  # unit name, or "" when no worker was reached
    priority: str
    status: int
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str  # "" or the kind: model_not_found, load_failed, upstream_error, ...
    stream: bool
    key: str = ""  # the API key's name, never the key
    route: str = ""  # the inference route (its template: /v1/responses/{id})

    def json(self) -> bytes:
        # One JSON field, not one Redis field per attribute: the client packs every
        # argument in Python, and 29 arguments a request cost more than the relay
        # (bench/README.md, the profile). dataclasses.asdict would deep-copy.
        return orjson.dumps({name: getattr(self, name) for name in _FIELDS})


_FIELDS = tuple(f.name for f in dataclass_fields(RequestRecord))


def client(url: str) -> aioredis.Redis:
    # Short timeouts: a slow Redis must cost a dropped batch, never a stalled loop.
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=1.0, socket_timeout=1.0, decode_responses=True, health_check_interval=10
    )


class RedisSink:
    def __init__(self, url: str, prefix: str = "ssw:", capacity: int = 50_000) -> None:
        self.redis = client(url)
        self.prefix = prefix
        self._buffer: collections.deque[RequestRecord] = collections.deque()
        self._capacity = capacity
        self.dropped = 0
        self.written = 0
        self._last_log = 0.0
        self._task: asyncio.Task[None] | None = None
        self.on_drop: Callable[[int], None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await tasks.cancel(self._task)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), 2)
        await self.redis.aclose()

    def record(self, rec: RequestRecord) -> None:
        if len(self._buffer) >= self._capacity:
            self._drop(1, "the buffer is full")
            return
        self._buffer.append(rec)

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        if self.on_drop is not None:
            self.on_drop(n)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("metrics: dropped %d request records so far (%s)", self.dropped, why)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            while self._buffer:
                if not await self._flush():
                    break

    async def _flush(self) -> bool:
        batch = [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]
        if not batch:
            return True
        pipe = self.redis.pipeline(transaction=False)
        stream = self.prefix + REQUESTS_KEY
        # Per-minute counters are added up here, one HINCRBY per model, minute and
        # field per batch: six commands a request cost more than the request itself.
        minutes: dict[str, collections.Counter[str]] = {}
        latency: dict[str, float] = collections.defaultdict(float)
        for rec in batch:
            fields: dict[Any, Any] = {"r": rec.json()}
            # Redis's own ID (the time of writing): records come in the order requests
            # end, not start, and an ID from the start time would be refused as out of
            # order after any request that outlived a later one.
            pipe.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True)
            minute = self.prefix + f"minute:{rec.model}:{time.strftime('%Y%m%d%H%M', time.gmtime(rec.ts))}"
            counts = minutes.setdefault(minute, collections.Counter())
            counts["requests"] += 1
            if rec.status >= 400 or rec.error:
                counts["errors"] += 1
            counts["prompt_tokens"] += rec.prompt_tokens or 0
            counts["completion_tokens"] += rec.completion_tokens or 0
            latency[minute] += rec.latency_ms
        for minute, counts in minutes.items():
            for name, n in counts.items():
                if n:
                    pipe.hincrby(minute, name, n)
            pipe.hincrbyfloat(minute, "latency_ms_sum", round(latency[minute], 2))
            pipe.expire(minute, MINUTE_TTL_S)
        try:
            await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._drop(len(batch), f"Redis: {exc}")
            return False
        self.written += len(batch)
        return True


# --- reading (the loader's /stats) -------------------------------------------------------


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 2)


async def served_counts(redis: aioredis.Redis, prefix: str, window_s: float) -> dict[str, int]:
    """Requests served (status below 400) per model within the window."""
    start_ms = int((time.time() - window_s) * 1000)
    entries = cast(
        "list[tuple[str, dict[str, str]]]",
        await redis.xrange(prefix + REQUESTS_KEY, min=str(start_ms), max="+", count=1_000_000),
    )
    counts: collections.Counter[str] = collections.Counter()
    for _id, entry in entries:
        try:
            f = orjson.loads(entry["r"])
            if int(f["status"]) < 400 and isinstance(f["model"], str):
                counts[f["model"]] += 1
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
            continue  # not a record of this version
    return dict(counts)


async def request_stats(redis: aioredis.Redis, prefix: str, window_s: float) -> dict[str, Any]:
    """Per model: count, errors, error rate, latency and TTFT percentiles, tokens per second."""
    start_ms = int((time.time() - window_s) * 1000)
    entries = cast(
        "list[tuple[str, dict[str, str]]]",
        await redis.xrange(prefix + REQUESTS_KEY, min=str(start_ms), max="+", count=1_000_000),
    )
    per: dict[str, dict[str, Any]] = {}
    for _id, entry in entries:
        try:
            f = orjson.loads(entry["r"])
        except (KeyError, orjson.JSONDecodeError):
            continue  # not a record of this version
        m = per.setdefault(
            f["model"],
            {
                "requests": 0,
                "errors": 0,
                "latency": [],
                "ttft": [],
                "prompt": 0,
                "completion": 0,
                "routes": collections.Counter(),
            },
        )
        m["requests"] += 1
        m["routes"][f.get("route") or "-"] += 1
        if f["status"] >= 400 or f["error"]:
            m["errors"] += 1
        m["latency"].append(float(f["latency_ms"]))
        if f["ttft_ms"] is not None:
            m["ttft"].append(float(f["ttft_ms"]))
        m["prompt"] += f["prompt_tokens"] or 0
        m["completion"] += f["completion_tokens"] or 0
    models = {}
    for name, m in sorted(per.items()):
        models[name] = {
            "requests": m["requests"],
            "errors": m["errors"],
            "error_rate": round(m["errors"] / m["requests"], 4),
            "latency_ms": {f"p{int(p * 100)}": _percentile(m["latency"], p) for p in (0.5, 0.95, 0.99)},
            "ttft_ms": {f"p{int(p * 100)}": _percentile(m["ttft"], p) for p in (0.5, 0.95, 0.99)},
            "prompt_tokens": m["prompt"],
            "completion_tokens": m["completion"],
            "prompt_tokens_per_s": round(m["prompt"] / window_s, 2),
            "completion_tokens_per_s": round(m["completion"] / window_s, 2),
            "routes": dict(sorted(m["routes"].items())),
        }
    return {"window_s": window_s, "models": models}


async def add_gpu_samples(redis: aioredis.Redis, prefix: str, samples: list[dict[str, Any]]) -> None:
    pipe = redis.pipeline(transaction=False)
    for s in samples:
        fields: dict[Any, Any] = {k: "" if v is None else str(v) for k, v in s.items()}
        pipe.xadd(prefix + f"gpu:{s['index']}", fields, maxlen=GPU_MAXLEN, approximate=True)
    await pipe.execute()
