"""The sections of ssw's configuration, one model each (:mod:`ssw.config` puts them
together and loads the file)."""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Where a worker's socket lives: workers.socket_dir/<unit's directory>/http.sock. The
# directory's name is a readable part of the unit's name and a digest (at most
# SOCKET_DIR_NAME_MAX long); the whole path must fit a socket address.
SOCKET_NAME = "http.sock"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
SOCKET_DIR_NAME_MAX = 24 + 1 + 10
# The longest first-token deadline a request may carry (X-SSW-Deadline-Ms) or a priority may have.


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Section):
    host: str = Field(description="Address to bind.")
    port: int = Field(ge=1, le=65535, description="TCP port to bind.")

    @field_validator("host")
    @classmethod
    def _valid_ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class SimulatedGpu(_Section):
    name: str = Field(default="Simulated GPU", description="Name shown in /status.")
    memory_gb: float = Field(gt=0, description="Total memory of the simulated device, in GB (10^9 bytes).")
    utilization_pct: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Utilization the device reports (for dashboards and alerts under test); unset: unknown, "
        "left out of /metrics as a real GPU's unknown value is.",
    )


class GpuSettings(_Section):
    source: Literal["nvml", "simulated"] = Field(
        default="nvml",
        description="Where GPU facts come from: 'nvml' (NVIDIA driver through nvidia-ml-py) or "
        "'simulated' (devices listed under 'simulated', for hosts without NVIDIA GPUs).",
    )
    simulated: list[SimulatedGpu] = Field(
        default_factory=list, description="Simulated devices, used only when source is 'simulated'."
    )
    sample_interval_s: float = Field(
        default=5.0, gt=0, description="Seconds between GPU samples (memory, utilization, temperature, power)."
    )

    @model_validator(mode="after")
    def _devices_for_simulation(self) -> GpuSettings:
        if self.source == "simulated" and not self.simulated:
            raise ValueError("source 'simulated' needs at least one device under 'simulated'")
        return self


class VllmSettings(_Section):
    python: Path = Field(
        default=Path("/opt/ssw/vllm/bin/python"),
        description="Python of vLLM's own virtual environment; workers run "
        "'<python> -m vllm.entrypoints.openai.api_server'.",
    )
    extra_args: list[str] = Field(default_factory=list, description="Arguments added to every worker's command line.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment added to every worker (a model's own env wins)."
    )
    responses_store: bool = Field(
        default=True,
        description="Workers of generative models keep the Responses they create "
        "(VLLM_ENABLE_RESPONSES_API_STORE=1), so that GET /v1/responses/{id}, cancel and "
        "previous_response_id work; vLLM holds them in the worker's memory until it stops.",
    )
    shutdown_timeout_s: int = Field(
        default=30,
        ge=0,
        description="vLLM's --shutdown-timeout: seconds in-flight requests may finish when a worker is "
        "unloaded or evicted (it takes no new ones).",
    )


class WorkerSettings(_Section):
    socket_dir: Path = Field(
        default=Path("/run/ssw/workers"),
        description="Each worker serves on a unix socket in a directory of its own under this one; only the "
        "gateway's group (and root) may enter those directories. Workers have no TCP port.",
    )
    slice: str = Field(default="ssw-workers.slice", description="Slice the worker units run in.")
    user: str = Field(
        default="ssw-worker",
        description="Account the workers run as; never root (ansible creates it, with no login and no home).",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="When a worker is unloaded or evicted it takes no new requests, and ssw waits this long "
        "for its in-flight ones to finish before stopping it.",
    )
    stop_timeout_s: int = Field(
        default=60, ge=1, description="TimeoutStopSec of worker units; longer than vllm.shutdown_timeout_s."
    )
    memory_max: str | None = Field(
        default=None, description="MemoryMax of each worker unit (host RAM, e.g. '64G'); None: unlimited."
    )
    limit_nofile: int = Field(
        default=65536,
        ge=1024,
        description="LimitNOFILE of each worker unit: one descriptor per client connection, and more.",
    )
    sleep_timeout_s: float = Field(
        default=60.0, gt=0, description="How long vLLM may take to go to sleep before its unit is stopped instead."
    )
    wake_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a wake (and its 1-token canary) may take before the unit is stopped and the "
        "model loads cold.",
    )
    freed_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="After a sleep, how long ssw waits to see its GPU memory come free (NVML) before it stops "
        "the unit instead and places nothing there until then.",
    )
    sleep_residual_gb: float = Field(
        default=1.0,
        ge=0,
        description="GPU memory a sleeping worker may keep (its CUDA context), in GB, for its sleep to count as "
        "having freed the GPU.",
    )

    @field_validator("socket_dir")
    @classmethod
    def _short_absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        longest = len(str(value)) + 1 + SOCKET_DIR_NAME_MAX + 1 + len(SOCKET_NAME)
        if longest > MAX_SOCKET_PATH:
            raise ValueError(
                f"too long: socket paths under it would take {longest} bytes, and a unix socket's path may take "
                f"{MAX_SOCKET_PATH} (keep it under {MAX_SOCKET_PATH - longest + len(str(value))} characters)"
            )
        return value

    @field_validator("user")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value in ("root", "0") or not value:
            raise ValueError("workers never run as root: name the unprivileged account they run as")
        return value

    @field_validator("slice")
    @classmethod
    def _a_slice(cls, value: str) -> str:
        if not value.endswith(".slice") or "/" in value:
            raise ValueError("must name a slice unit, e.g. ssw-workers.slice")
        return value


class HealthSettings(_Section):
    interval_s: float = Field(
        default=0.1,
        gt=0,
        description="Seconds between /health probes of a loading worker: how late, at most, a load is "
        "seen to be done (a refused probe costs microseconds).",
    )
    check_interval_s: float = Field(default=10.0, gt=0, description="Seconds between /health probes of a ready worker.")
    start_timeout_s: float = Field(
        default=900.0, gt=0, description="A worker not healthy within this many seconds of its start is failed."
    )
    probe_timeout_s: float = Field(default=5.0, gt=0, description="Timeout of one /health probe.")
    probe_max_bytes: int = Field(
        default=4 * 2**20,
        ge=65536,
        description="Most a probe reads of a worker's answer (/metrics, /openapi.json); beyond, that probe fails.",
    )
    failures_to_replace: int = Field(
        default=3,
        ge=1,
        description="A ready worker whose /health (or canary) fails this many checks in a row is killed and "
        "replaced (restart backoff applies).",
    )
    canary_interval_s: float = Field(
        default=120.0,
        ge=0,
        description="Every this many seconds, an idle ready worker must generate one token (a 1-token "
        "completion), which catches an engine that answers /health but cannot generate; 0: off.",
    )
    canary_timeout_s: float = Field(default=30.0, gt=0, description="How long the 1-token canary may take.")
    known_answer: bool = Field(
        default=True,
        description="On a model's first healthy start, record its greedy answer to a fixed prompt (its text, and "
        "each token's logprob); after every wake and every later start, ask again and compare. A worker that "
        "answers wrongly is stopped; after a wake the model loads cold and sleeps no more until an operator "
        "clears it (ssw clear-check MODEL). Models that do not complete text are not checked.",
    )
    known_answer_logprob_tolerance: float = Field(
        default=0.05,
        ge=0,
        description="How far a token's logprob may move between two answers that count as the same (GPU "
        "kernels are not bit-exact across runs; the text must match exactly).",
    )


class PlacementSettings(_Section):
    policy: Literal["spread", "pack"] = Field(
        default="spread",
        description="'spread': the GPU with the most free VRAM; 'pack': the GPU where the model fits most tightly.",
    )
    min_residency_s: float = Field(
        default=0.0,
        ge=0,
        description="A worker that became ready is not evicted for this long (pinned ones never are), unless "
        "a realtime request needs the room and nothing else can make it: two models asked for in turn on one "
        "GPU then take turns at this pace rather than swapping on every request. 0: off.",
    )
    drain_queue_before_swap: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Before a worker is evicted for a load as urgent as the requests in flight on it, it "
        "keeps serving until it is idle or has answered this many more requests (or swap_wait_s passed): "
        "demand that alternates between two models is served in runs, with fewer swaps. 0: off.",
    )
    swap_wait_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long a load waits for the requests in flight on the worker it would evict: the "
        "drain above, and a swap whose victim more urgent requests wait for (it fails after this).",
    )
    runtime_overhead_gb: float = Field(
        default=0.95,
        ge=0,
        description="VRAM a worker holds beyond weights and KV cache (CUDA context, activations), per GPU, in GB.",
    )
    kv_cache_sequences: int = Field(
        default=1,
        ge=1,
        description="Full-length sequences the estimated KV cache holds when models.yaml gives no vram_gb.",
    )
    measured_margin: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Headroom added to a model's measured VRAM footprint when it is used instead of the estimate.",
    )
    tensor_parallel: bool = Field(
        default=False,
        description="Split a model that fits no single GPU across several with vLLM's tensor parallelism.",
    )
    failed_load_cooldown_s: float = Field(
        default=60.0,
        ge=0,
        description="After a failed load the model is refused this long, with the reason.",
    )
    restart_backoff_s: float = Field(
        default=2.0, gt=0, description="First delay before restarting a worker that died; doubles each time."
    )
    restart_backoff_max_s: float = Field(default=300.0, gt=0, description="Longest delay between restarts.")
    max_restarts: int = Field(
        default=5,
        ge=0,
        description="An unpinned model whose worker died this many times in a row goes into the failed-load "
        "cooldown instead of being restarted (pinned models are always restarted).",
    )
    sleep_ram_gb: float | None = Field(
        default=None,
        ge=0,
        description="Host memory sleeping workers may hold in all (cgroup MemoryCurrent), in GB; past it the "
        "least recently used sleeper is stopped. None: sleep_ram_fraction of the host's memory.",
    )
    prewarm_hours: float = Field(
        default=24.0,
        ge=0,
        description="When the loader starts, load the models most requested in this many past hours (request "
        "records in Redis), most requested first, as long as they fit in free VRAM; never evicts. 0: off.",
    )
    sleep_ram_fraction: float = Field(
        default=0.5, ge=0, le=1, description="The sleepers' host memory budget as a fraction of the host's memory."
    )


class SystemdSettings(_Section):
    bus_address: str | None = Field(
        default=None,
        description="D-Bus address of the system bus running the workers (None: the system bus, "
        "or $DBUS_SYSTEM_BUS_ADDRESS).",
    )
    journal_directory: Path | None = Field(
        default=None,
        description="Read worker logs from this journal directory instead of the host's journal "
        "(for disposable test hosts).",
    )


class AuthSettings(_Section):
    enabled: bool = Field(
        default=True,
        description="Require an API key on /v1/*. Turning it off is logged as a warning at every start.",
    )
    keys_file: Path = Field(
        default=Path("/etc/ssw/keys.yaml"), description="API keys (SHA-256 digests), managed by `ssw keys`."
    )
    admin_token_file: Path = Field(
        default=Path("/var/lib/ssw/admin.token"),
        description="Token for the admin API; created by the loader if absent, readable by admin_group.",
    )
    gateway_token_file: Path = Field(
        default=Path("/var/lib/ssw/gateway.token"),
        description="The gateway's own credential for the loader; created if absent, readable by gateway_group.",
    )
    admin_group: str = Field(default="ssw-admin", description="Group of the operators who may use the admin API.")
    gateway_group: str = Field(default="ssw", description="Group of the gateway's account.")


class PullSettings(_Section):
    endpoint: str | None = Field(
        default=None, description="The hub pulls download from (default: huggingface_hub's, or HF_ENDPOINT)."
    )
    token_file: Path | None = Field(
        default=Path("/etc/ssw/hf-token"), description="A hub token for gated models, if this file exists."
    )
    min_free_gb: float = Field(
        default=5.0,
        ge=0,
        description="A pull is refused if it would leave less than this free on the models dir, counting what "
        "the pulls already running still have to write.",
    )
    allow_http: bool = Field(
        default=False,
        description="Fetch from a plain http:// endpoint (and follow redirects to http://): only for a mirror on a "
        "network you trust, or a test hub. Off, a pull speaks https:// only.",
    )

    @model_validator(mode="after")
    def _https_endpoint(self) -> PullSettings:
        if self.endpoint is not None and not self.endpoint.startswith("https://") and not self.allow_http:
            raise ValueError(f"endpoint: {self.endpoint!r} is not https:// (set pulls.allow_http: true to allow it)")
        return self


class LimitSettings(_Section):
    max_body_bytes: int = Field(default=10 * 2**20, ge=1024, description="Largest request body (413 beyond).")
    max_upload_bytes: int = Field(
        default=25 * 2**20, ge=1024, description="Largest multipart body, an audio file with its form (413 beyond)."
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="Largest total of a request's line and headers (431, counted as they arrive: the rest is "
        "never read).",
    )
    max_headers: int = Field(default=100, ge=8, description="Most header fields in one request (431 beyond).")
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A request's line and headers must arrive within this of the connection opening (or of the "
        "first byte of a kept-alive connection's next request), however they trickle; the connection is "
        "closed otherwise (408).",
    )
    max_connections: int = Field(
        default=8192,
        ge=16,
        description="Open connections the public port holds per gateway process; one more is refused with "
        "503 and closed at once.",
    )
    max_connections_per_client: int = Field(
        default=512,
        ge=1,
        description="Open connections from one client address per gateway process (503 and closed beyond).",
    )
    max_messages: int = Field(default=2048, ge=1, description="Most messages in one chat request (400 beyond).")
    max_in_flight_per_key: int = Field(
        default=256, ge=1, description="Requests one API key may have in flight (429 beyond); a key may set less."
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A client must send its whole body within this (408 otherwise); an uploaded file gets this "
        "plus a second per min_body_rate_bytes_s it carries.",
    )
    min_body_rate_bytes_s: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="The slowest upload (POST /v1/files) accepted, in bytes per second beyond body_timeout_s.",
    )
    max_json_depth: int = Field(
        default=64, ge=4, le=200, description="How deeply a request body's JSON may nest (400 beyond)."
    )


class BatchSettings(_Section):
    dir: Path = Field(
        default=Path("/var/lib/ssw/batches"),
        description="Where the gateway keeps uploaded files, batch results and async jobs (its state in Redis).",
    )
    max_file_bytes: int = Field(default=200 * 2**20, ge=1024, description="Largest uploaded file (413 beyond).")
    max_lines: int = Field(default=50_000, ge=1, description="Most requests in one batch's input file.")
    concurrency_per_model: int = Field(
        default=4, ge=1, description="Batch lines and async jobs one model runs at once, across the host."
    )
    protect_interactive_s: float = Field(
        default=600.0,
        ge=0,
        description="A batch never loads a model by evicting one that served interactive (not batch) "
        "traffic within this many seconds; its lines wait instead.",
    )
    yield_check_s: float = Field(
        default=0.5,
        gt=0,
        description="How often the batch runner reads each busy model's queue; while interactive requests "
        "queue at a worker (vLLM's waiting requests), no new batch line starts on that model.",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Tries for a line that a worker fails with a 5xx before it counts as failed."
    )
    retain_s: float = Field(
        default=30 * 24 * 3600.0,
        gt=0,
        description="How long finished batches, async jobs and their files are kept after they end.",
    )
    job_timeout_s: float = Field(
        default=24 * 3600.0, gt=0, description="An async job (X-SSW-Async) not run within this long expires."
    )
    max_completion_window_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Longest completion_window a batch may ask for."
    )


class FleetSettings(_Section):
    redis_url: str | None = Field(
        default=None,
        description="The fleet's shared Redis (redis://:password@host:6379/0, rediss:// for TLS); "
        "None: this host is on its own, exactly as without a fleet.",
    )
    host: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", description="This host's name (default: hostname)."
    )
    advertise_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+$",
        description="How the other hosts' gateways reach this one's fleet listener, e.g. https://10.0.0.2:8443 "
        "(needed with a fleet).",
    )
    listen: Listen | None = Field(
        default=None,
        description="The fleet listener: where the other hosts' gateways send their hops, on the fleet's network "
        "(e.g. 10.0.0.2:8443), TLS with this host's certificate; only signed hops are served there, and the public "
        "port never accepts one. Needed with a fleet.",
    )
    credential_file: Path = Field(
        default=Path("/etc/ssw/fleet.token"),
        description="The fleet's secret: hops are signed with it (the same file on every host; it never travels).",
    )
    tls_ca_file: Path | None = Field(
        default=None, description="The fleet's CA: it signed every host's certificate (and the fleet Redis's)."
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="This host's certificate, signed by the fleet's CA: the fleet listener's, and the one it "
        "presents to other hosts and to the fleet's Redis.",
    )
    tls_key_file: Path | None = Field(default=None, description="The private key of tls_cert_file.")
    insecure: bool = Field(
        default=False,
        description="Allow a fleet over plain http:// and redis:// (logged as a warning at every start): hops "
        "are still signed, but anyone on the fleet's network reads the prompts.",
    )
    heartbeat_s: float = Field(default=2.0, gt=0, description="How often each loader publishes its host's state.")
    ttl_s: float = Field(default=10.0, gt=0, description="A host not heard from for this long is dropped from routing.")
    load_lease_s: float = Field(
        default=60.0, gt=0, description="How long a fleet-wide decision of where to load a model stands."
    )
    rank_ports: tuple[int, int] = Field(
        default=(29500, 29999),
        description="The ports a model across hosts may take as its master port (vLLM --master-port), a new one "
        "per start; its ranks reach each other on the fleet listener's address (listen.host).",
    )

    def rank_address(self) -> str | None:
        """Where this host's ranks of a model across hosts listen: the fleet listener's address."""
        if self.listen is None or ipaddress.ip_address(self.listen.host).is_unspecified:
            return None
        return self.listen.host

    @model_validator(mode="after")
    def _advertised(self) -> FleetSettings:
        if self.ttl_s < 2 * self.heartbeat_s:
            raise ValueError("ttl_s must be at least twice heartbeat_s")
        low, high = self.rank_ports
        if not 1024 <= low < high <= 65535:
            raise ValueError(f"rank_ports: [{low}, {high}] is not a range of ports from 1024 to 65535")
        if not self.redis_url:
            return self
        if not self.advertise_url:
            raise ValueError("advertise_url is required when fleet.redis_url is set")
        if self.listen is None:
            raise ValueError("listen (the fleet listener, on the fleet's network) is required with a fleet")
        if self.insecure:
            return self
        if not self.advertise_url.startswith("https://"):
            raise ValueError(f"advertise_url: {self.advertise_url!r} is not https:// (or set fleet.insecure: true)")
        if not self.redis_url.startswith("rediss://"):
            raise ValueError("redis_url: the fleet's Redis is not rediss:// (TLS) (or set fleet.insecure: true)")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(self, name) is None:
                raise ValueError(f"{name} is required for a fleet over TLS (or set fleet.insecure: true)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)

    def host_name(self) -> str:
        return self.host or socket.gethostname()


class TracingSettings(_Section):
    otlp_endpoint: str | None = Field(
        default=None,
        description="Where spans go, as OTLP over HTTP (e.g. http://127.0.0.1:4318/v1/traces); unset: tracing "
        "is off and costs nothing. Each request (admission, waiting with the load's phases, relay to the first "
        "token, the stream's end) and each load (placement, eviction, unit start, engine ready) is a span, "
        "linked by trace context, which goes on to the workers as traceparent.",
    )
    sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="The share of traces kept (a client's sampled traceparent is kept)."
    )
    worker_spans: bool = Field(
        default=False,
        description="vLLM exports its own spans too (--otlp-traces-endpoint): its workers then leave their "
        "private network namespace, with IP traffic allowed to loopback and the endpoint's address only.",
    )
    export_timeout_s: float = Field(default=5.0, gt=0, description="How long one export of spans may take.")

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value

    @model_validator(mode="after")
    def _workers_reach_an_address(self) -> TracingSettings:
        # A worker's IP allow-list takes addresses: its endpoint is named by one.
        host = urllib.parse.urlsplit(self.otlp_endpoint or "").hostname or ""
        if self.worker_spans and self.otlp_endpoint and host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(
                    "tracing.worker_spans needs otlp_endpoint's host as an IP address or localhost "
                    "(the workers' IP allow-list)"
                ) from None
        return self
