"""The contract between the loader and its clients (the gateway, the CLI): what
the loader publishes on ``GET /events`` and answers on ``GET /status``.

One typed, versioned model used on both sides. ``epoch`` changes every time a
loader starts, so a client recognises a restarted loader (whose ``seq`` starts
again from 0) and asks again for what it was waiting for.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress

from ssw.common.states import LoadState, WorkerState

CONTRACT_VERSION: Literal[1] = 1

# What may name a model or an alias. It keeps names safe as path parts and as
# the readable part of unit names; anything else a client sends is refused
# before it gets near the file system or systemd.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# An alias may carry a tag as Ollama users type names (deepseek-coder:33b): an alias
# only ever resolves to a model's name, never reaches a path or a unit itself.
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[A-Za-z0-9][A-Za-z0-9._-]{0,63})?\Z")


# A request's priority and its rank (lower is more urgent): the gateway orders its
# waiters by it, and the loader weighs who waits for a worker it might evict by it.
PRIORITY_RANK = {"realtime": 0, "interactive": 1, "batch": 2}


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.match(name) is not None and ".." not in name


def valid_alias(name: object) -> bool:
    return isinstance(name, str) and ALIAS_RE.match(name) is not None and ".." not in name


class _View(BaseModel):
    # Fields a newer loader adds are ignored by an older client of the same version.
    model_config = ConfigDict(extra="ignore", frozen=True)


class WorkerView(_View):
    unit: str
    model: str
    replica: int
    state: WorkerState
    state_reason: str = ""
    state_for_s: float = 0.0
    gpus: list[int]
    socket: str
    pinned: bool = False
    vram_budget_bytes: int = 0
    vram_measured_bytes: int | None = None
    uptime_s: float = 0.0
    idle_s: float = 0.0
    adopted: bool = False
    unit_active: bool = False
    load_phases_s: dict[str, float] | None = None
    load_marks: dict[str, float] = Field(default_factory=dict)  # when each step of its load happened (wall time)
    adapters: list[str] = Field(default_factory=list)  # LoRA adapters loaded in it, by model name
    sleep_mode: bool = False  # started with vLLM's sleep mode
    sleep_level: int | None = None  # while sleeping: 1 (weights in host RAM) or 2 (weights dropped)
    ram_bytes: int | None = None  # host memory of its unit (cgroup MemoryCurrent) when last read
    # A model across hosts: its node rank (0, the head, serves; the others are headless and
    # never routed to) and its group ("<id>: hosta (head), hostb"); None on one host.
    rank: int = 0
    group: str | None = None


class LoadProgress(_View):
    """A load or wake in progress: which phase it is in, since when, and how long such
    a one took here before (the median), from which a client reckons its ETA."""

    kind: Literal["load", "wake"]
    phase: str  # placement, eviction, unit_start, process_up, engine_ready; waking, canary for a wake
    started: float  # wall time it was asked for
    expected_s: float | None = None  # the median measured here; None: never measured

    def elapsed_s(self, now: float) -> float:
        return max(now - self.started, 0.0)

    def eta_s(self, now: float) -> float | None:
        """Seconds left by the measured median (0 once past it: it is late, not done)."""
        if self.expected_s is None:
            return None
        return max(self.expected_s - self.elapsed_s(now), 0.0)

    def describe(self, now: float) -> dict[str, Any]:
        """What /v1/models, /status and a held stream's keep-alives show."""
        eta = self.eta_s(now)
        return {
            "kind": self.kind,
            "phase": self.phase,
            "elapsed_s": round(self.elapsed_s(now), 1),
            "expected_s": None if self.expected_s is None else round(self.expected_s, 1),
            "eta_s": None if eta is None else round(eta, 1),
        }


class LoadView(_View):
    """A model's load record."""

    state: LoadState = LoadState.IDLE
    reason: str = ""
    since: float = 0.0  # wall time the record entered this state
    deadline: float | None = None  # wall time a backoff or cooldown ends
    last_error: str | None = None
    recent_failures: int = 0  # within the crash window
    progress: LoadProgress | None = None  # a load or wake of it in progress on this host


class ModelDetails(_View):
    """What the registry read from a model's files (for clients that list models, such as
    Ollama's /api/tags and /api/show)."""

    family: str | None = None  # config.json's model_type
    architectures: list[str] = Field(default_factory=list)
    dtype: str | None = None
    quantization: str | None = None
    weight_bytes: int = 0
    parameters: int | None = None  # estimated from the weights' size and dtype
    context_length: int | None = None  # max_model_len, else the model's max_position_embeddings
    modified_at: float | None = None  # config.json's mtime
    vision: bool = False  # it takes images (config.json has a vision_config)
    chat_template: str | None = None  # tokenizer_config.json's, when it is a string of a sane size


class ModelView(_View):
    aliases: list[str] = Field(default_factory=list)
    pinned: bool = False
    load: LoadView = Field(default_factory=LoadView)
    load_seconds: float | None = None  # median of measured loads; None: never loaded here
    wake_seconds: float | None = None  # median of measured wakes from sleep; None: never woke here
    base: str | None = None  # a LoRA adapter: the model whose workers serve it
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    fallbacks: list[str] = Field(default_factory=list)
    fallback_default: bool = False
    scheduling_policy: str | None = None
    max_tokens: int | None = None
    # What it can serve (routes.Family values): measured from a worker that ran, else predicted.
    capabilities: list[str] = Field(default_factory=list)
    capabilities_measured: bool = False
    details: ModelDetails = Field(default_factory=ModelDetails)
    # How long its workers may stay idle (keep_alive as a client last set it, else idle_ttl_s);
    # None or negative: until evicted or unloaded.
    idle_ttl_s: float | None = None


class SplitView(_View):
    """An A/B split: a name whose traffic goes to several models by share."""

    shares: dict[str, float]
    sticky: str = "key"  # who stays on one model: "key" (the API key) or "user" (the request's user)


class Snapshot(_View):
    version: Literal[1] = CONTRACT_VERSION
    epoch: str  # a new value each time a loader starts
    seq: int  # increases with every change within an epoch
    models: dict[str, ModelView]
    aliases: dict[str, str]
    splits: dict[str, SplitView] = Field(default_factory=dict)
    missing: dict[str, str] = Field(default_factory=dict)  # configured, files absent: name -> expected path
    workers: list[WorkerView]


class GpuView(_View):
    index: int
    uuid: str
    name: str
    simulated: bool
    memory_total_bytes: int
    memory_used_bytes: int
    memory_reserved_bytes: int
    memory_releasing_bytes: int
    memory_free_bytes: int
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    workers: list[str]


class EventView(_View):
    """One change in the lifecycle of a worker or a load, as the status page's log shows it."""

    at: float  # wall time
    kind: str  # the state reached (ready, draining, sleeping, failed, cooling_down, ...)
    model: str
    unit: str | None = None  # None: a load record's change
    text: str


class ModelStatus(ModelView):
    path: str
    weight_bytes: int
    vram_need_bytes: int
    vram_need_source: str
    measured_vram_bytes: int | None
    unit: str
    # Median cold start per set of start options tried (POST /coldstart), "{}" as configured.
    cold_starts: dict[str, float] = Field(default_factory=dict)
    cold_start_best: str | None = None
    # The known-answer check: recorded?, failures, the last one, and why it may not sleep.
    known_answer: dict[str, Any] = Field(default_factory=dict)


class Status(_View):
    """``GET /status``: the snapshot with everything an operator wants to see."""

    version: Literal[1] = CONTRACT_VERSION
    epoch: str
    seq: int
    ssw_version: str
    uptime_s: float
    gpu_source: str
    placement_policy: str
    evictions_total: int
    gpus: list[GpuView]
    models: dict[str, ModelStatus]
    aliases: dict[str, str]
    missing: dict[str, str]
    workers: list[WorkerView]
    events: list[EventView] = Field(default_factory=list)  # the latest changes, oldest first


class LoadAccepted(_View):
    """``POST /load`` with ``wait: false``: where the load stands, as of which snapshot."""

    model: str
    load: LoadView
    epoch: str
    seq: int


class Preview(_View):
    """Where loading a model on a host would leave it (the fleet's placement input)."""

    free_after_bytes: int  # free on the GPU it would take, after it and its evictions
    victims: int  # workers it would evict


class HostRecord(_View):
    """One host of a fleet, as its loader publishes it to the fleet's Redis every heartbeat."""

    version: Literal[1] = CONTRACT_VERSION
    host: str
    url: str  # its gateway, as the other hosts reach it
    epoch: str
    at: float  # wall time of this heartbeat
    gpus: list[GpuView]
    models: dict[str, ModelView]
    aliases: dict[str, str]
    workers: list[WorkerView]
    # Models on its disk that no worker serves: what loading each would take (None: it cannot).
    previews: dict[str, Preview | None] = Field(default_factory=dict)
    # Where the ranks of a model across hosts reach this host (its fleet address); None: nowhere.
    rank_address: str | None = None


# Patterns for pydantic (Rust regexes: "$" is the end of the text).
GROUP_ID_RE = r"^[0-9a-f]{8,32}$"


class GroupMember(_View):
    host: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    rank: int = Field(ge=0, le=63)  # vLLM's node rank
    address: IPvAnyAddress  # where its ranks listen, on the fleet's network


class GroupRecord(_View):
    """One start of a model across hosts, in the fleet's Redis (``ssw:fleet:group:<model>``):
    written by its head's loader, read by every member's, which start, stop and report
    their ranks by it. A new start is a new ``id`` on a new ``master_port``: a rank of
    an earlier start never joins it."""

    version: Literal[1] = CONTRACT_VERSION
    id: str = Field(pattern=GROUP_ID_RE)
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    head: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    master_addr: IPvAnyAddress
    master_port: int = Field(ge=1024, le=65535)
    members: list[GroupMember] = Field(min_length=2, max_length=64)
    state: Literal["starting", "ready", "ending"] = "starting"
    reason: str = Field(default="", max_length=2000)  # why it is ending
    unloaded: bool = False  # ending on purpose (unloaded on a member host): not loaded again
    at: float  # wall time of its last change

    def member(self, host: str) -> GroupMember | None:
        return next((m for m in self.members if m.host == host), None)

    def describe(self) -> str:
        return f"{self.id}: " + ", ".join(m.host + (" (head)" if m.rank == 0 else "") for m in self.members)
