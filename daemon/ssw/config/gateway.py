"""The gateway's section of the configuration (``gateway:`` in config.yaml): how
requests for models that are not ready are treated, deadlines, the relay's limits
towards workers, routing and the per-worker cap, metrics and stored Responses."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ssw.config.sections import Listen, _Section

MAX_DEADLINE_MS = 600_000


NotLoaded = Literal["wait", "accept", "unavailable"]


Priority = Literal["realtime", "interactive", "batch"]
DeadlineMs = Annotated[int, Field(ge=1, le=MAX_DEADLINE_MS)]


class GatewaySettings(_Section):
    not_loaded: NotLoaded = Field(
        default="wait",
        description="What a request for a model that is not ready gets: 'wait' (held until the model is ready, "
        "then served; an unmodified OpenAI SDK just sees a slow answer), 'accept' (202 with Retry-After and "
        "{status: loading}), 'unavailable' (503 with Retry-After, which the SDKs retry). An API key may "
        "set its own; X-SSW-Wait: true or false on a request wins.",
    )
    wait_timeout_s: float = Field(
        default=180.0, gt=0, description="How long a held request waits for its model to become ready (503 after)."
    )
    deadlines_ms: dict[Priority, DeadlineMs] = Field(
        default_factory=dict,
        description="Per priority, how long a request may wait for its first token while its model is not ready "
        "(e.g. {realtime: 500}); X-SSW-Deadline-Ms on a request wins. Past it (the model's measured load or "
        "wake is longer, or a held request's deadline passes) the request is answered at once by a ready "
        "fallback, or with a 503 and the load's ETA; the load goes on. None by default: requests wait.",
    )
    keepalive_s: float = Field(
        default=10.0,
        gt=0,
        description="A held streamed request starts its event stream after this long and sends an SSE comment "
        "this often, so that proxies and clients do not time it out.",
    )
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0, description="Timeout connecting to a worker.")
    upstream_read_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Longest silence from a worker in the middle of a response; in a stream, longest time "
        "without one whole event (a peer that drips bytes without ever ending an event is cut off).",
    )
    upstream_headers_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="A worker's (or a peer gateway's) answer must have its whole headers within this of the "
        "request going out, however it trickles (vLLM sends a non-streamed answer's headers once it is done).",
    )
    upstream_max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest total of a worker's response headers (the request fails)."
    )
    upstream_max_headers: int = Field(default=100, ge=8, description="Most headers in a worker's response.")
    upstream_max_body_bytes: int = Field(
        default=16 * 2**20,
        ge=65536,
        description="Largest non-streamed answer relayed from a worker (the request fails with 502 beyond).",
    )
    upstream_max_event_bytes: int = Field(
        default=8 * 2**20, ge=4096, description="Largest single server-sent event in a worker's stream."
    )
    loader_url: str = Field(
        default="http://127.0.0.1:8001", description="Where the gateway reaches the loader's admin API."
    )
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="How long a stopping gateway lets in-flight requests finish."
    )
    max_waiters_per_model: int = Field(
        default=1000, ge=1, description="Requests that may wait for one model's load; more get 429."
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Gateway processes sharing the public port (SO_REUSEPORT); the relay is CPU-bound, so "
        "a host with spare cores serves more with more. Each follows the loader and holds its own waiting "
        "requests; metrics add up.",
    )
    routing: Literal["round_robin", "least_outstanding"] = Field(
        default="round_robin",
        description="How requests are spread over a model's replicas (realtime requests always go to the "
        "one with the fewest requests in flight).",
    )
    non_realtime_cap_per_worker: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="While a model has realtime traffic (within realtime_window_s), at most this many "
        "interactive and batch requests in flight on each of its workers, per gateway process; more wait "
        "in the gateway. Set it below the model's max_num_seqs so a realtime request finds a free slot "
        "rather than queueing behind a full batch (vLLM's priority scheduling orders its queue but does "
        "not free a running slot). None: no cap.",
    )
    realtime_window_s: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="How long after a realtime request its model counts as having realtime traffic.",
    )
    metrics_listen: Listen | None = Field(
        default=Listen(host="127.0.0.1", port=8002),
        description="Where the gateway's Prometheus /metrics listens (None: nowhere but, if set, the public port).",
    )
    public_metrics: bool = Field(default=False, description="Also serve the gateway's /metrics on the public port.")
    access_log: bool = Field(default=True, description="One key=value log line per request.")
    metrics_buffer: int = Field(
        default=50_000, ge=100, description="Request records held for Redis; beyond that they are dropped."
    )
    responses_remember_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="How long the gateway remembers which worker holds a stored Response (in Redis, so every "
        "gateway process and a restarted gateway know it).",
    )
    responses_max: int = Field(
        default=100_000, ge=100, description="Stored Responses each gateway process remembers in memory (LRU)."
    )
