"""The vLLM command line and environment of a worker (pure).

Built only from the registry and the config: nothing a client sends reaches it.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ssw.common.contract import GroupRecord
from ssw.common.routes import Family
from ssw.config import Config, TracingSettings
from ssw.loader.models.capabilities import predict
from ssw.loader.models.registry import ModelSpec
from ssw.loader.models.spans import Span
from ssw.loader.systemd.units import NVIDIA_CONTROL_DEVICES, WorkerUnit, escape, parse_size

ENTRY_POINT = "vllm.entrypoints.openai.api_server"
CACHE_ROOT = "ssw"  # /var/cache/ssw/<model>: vLLM's, torch's and Triton's compile caches

# Variables that let ssw recognise its own units and read them back on adoption.
ENV_MODEL = "SSW_MODEL"
ENV_REPLICA = "SSW_REPLICA"
ENV_SOCKET = "SSW_SOCKET"
ENV_GPU = "SSW_GPU"
ENV_BUDGET = "SSW_VRAM_BYTES"
ENV_SLEEP = "SSW_SLEEP"  # started with sleep mode
ENV_RANK = "SSW_RANK"  # a model across hosts: its node rank (0: the head)
ENV_GROUP = "SSW_GROUP"  # ...and the id of its group's start
# The program of a headless rank (run by the vLLM environment's Python).
RANK_PROGRAM = Path(__file__).with_name("vllm_rank.py")
RESPONSES_STORE = "VLLM_ENABLE_RESPONSES_API_STORE"
SLEEP_DEV_MODE = "VLLM_SERVER_DEV_MODE"
RUNTIME_LORA = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class RankPart:
    """This host's part in a model across hosts: its node rank in one start of the group."""

    span: Span
    rank: int
    group: GroupRecord
    address: str  # where this host's ranks listen (VLLM_HOST_IP)
    interface: str | None = None  # the network interface that carries it

    @property
    def addresses(self) -> tuple[str, ...]:
        """The group's hosts' addresses, this one's included (its ranks reach each other
        over it too): the only ones its rank traffic may reach."""
        return tuple(str(m.address) for m in self.group.members)


def rank_args(part: RankPart) -> list[str]:
    """vLLM's multi-node arguments, the same on every host but for the node rank."""
    return [
        "--pipeline-parallel-size",
        str(part.span.pipeline_parallel),
        "--distributed-executor-backend",
        "mp",
        "--nnodes",
        str(part.span.hosts),
        "--node-rank",
        str(part.rank),
        "--master-addr",
        str(part.group.master_addr),
        "--master-port",
        str(part.group.master_port),
    ]


def sleep_enabled(spec: ModelSpec, gpu_kind: str) -> bool:
    """Whether the model's workers start with sleep mode: as models.yaml says, and by
    default on GPU hosts only (vLLM on the CPU refuses --enable-sleep-mode). Never for
    a model across hosts: its ranks on the other hosts would keep their memory
    counted while the head slept."""
    if spec.span is not None:
        return False
    if spec.sleep == "auto":
        return gpu_kind == "nvml" and not spec.pinned
    return bool(spec.sleep)


def cache_directory(model: str) -> str:
    """The model's directory under /var/cache (systemd's CacheDirectory=), kept across restarts."""
    return f"{CACHE_ROOT}/{escape(model)}"


def vllm_argv(
    cfg: Config,
    spec: ModelSpec,
    socket: Path,
    budget_bytes: int,
    gpu_total_bytes: int | None,
    kv_bytes: int | None = None,
    tensor_parallel: int = 1,
    sleep: bool = False,
    part: RankPart | None = None,
) -> list[str]:
    headless = part is not None and part.rank > 0
    argv = [
        str(spec.python or cfg.vllm.python),
        *([str(RANK_PROGRAM)] if headless else ["-m", ENTRY_POINT]),
        "--model",
        str(spec.path),
        "--served-model-name",
        spec.name,
        # Its only listener: no TCP port, and the socket's directory decides who may connect.
        "--uds",
        str(socket),
        "--shutdown-timeout",
        str(cfg.vllm.shutdown_timeout_s),
    ]
    if gpu_total_bytes:
        # vLLM takes a fraction of the device's total memory; the budget is in
        # bytes, so several workers share a GPU without overlapping.
        fraction = min(budget_bytes / gpu_total_bytes, 0.98)
        argv += ["--gpu-memory-utilization", f"{fraction:.4f}"]
        if kv_bytes:
            # A KV cache of the planned size, not whatever the fraction leaves:
            # the measured footprint then tells the truth for later placements.
            argv += ["--kv-cache-memory-bytes", str(kv_bytes)]
    if part is not None:
        tensor_parallel = part.span.tensor_parallel
    if tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel)]
    if part is not None:
        argv += rank_args(part)
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.max_num_seqs:
        argv += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_call_parser]
    if spec.scheduling_policy:
        argv += ["--scheduling-policy", spec.scheduling_policy]
    if spec.reasoning_parser:
        argv += ["--reasoning-parser", spec.reasoning_parser]
    if spec.runner != "auto":
        argv += ["--runner", spec.runner]
    if spec.convert != "auto":
        argv += ["--convert", spec.convert]
    if sleep:
        argv += ["--enable-sleep-mode"]
    if spec.lora is not None:
        # Adapters are loaded and unloaded at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING).
        argv += ["--enable-lora", "--max-loras", str(spec.lora[0]), "--max-lora-rank", str(spec.lora[1])]
    if spec.enforce_eager:
        argv += ["--enforce-eager"]
    if spec.load_format:
        argv += ["--load-format", spec.load_format]
    if spec.compilation_config is not None:
        argv += ["--compilation-config", json.dumps(spec.compilation_config)]
    if spec.chat_template_kwargs:
        # Also the server's default, so clients that reach a worker directly get it.
        argv += ["--default-chat-template-kwargs", json.dumps(spec.chat_template_kwargs)]
    if cfg.tracing.worker_spans and cfg.tracing.otlp_endpoint:
        # vLLM's own spans, children of the gateway's (the relay sends traceparent).
        argv += ["--otlp-traces-endpoint", cfg.tracing.otlp_endpoint]
    argv += list(cfg.vllm.extra_args) + list(spec.extra_args)
    return argv


def worker_unit(
    cfg: Config,
    spec: ModelSpec,
    unit: str,
    replica: int,
    socket: Path,
    gpus: tuple[int, ...],
    budget_bytes: int,
    gpu_total_bytes: int | None,
    kv_bytes: int | None = None,
    device_nodes: tuple[str, ...] = (),
    sleep: bool = False,
    part: RankPart | None = None,
) -> WorkerUnit:
    """``budget_bytes`` is per GPU; ``gpu_total_bytes`` is None for simulated GPUs
    (vLLM on the CPU has no device memory to check); ``device_nodes`` are the
    GPUs' own /dev/nvidiaN (none on simulated hosts)."""
    devices = ",".join(str(g) for g in gpus)
    cache = f"/var/cache/{cache_directory(spec.name)}"
    # Stored responses make GET, cancel and previous_response_id work; vLLM keeps
    # them in the worker's memory until it stops (the gateway routes to them).
    store = {RESPONSES_STORE: "1"} if cfg.vllm.responses_store and Family.RESPONSES in predict(spec.shape) else {}
    # vLLM mounts /sleep, /wake_up and /is_sleeping only in its development mode,
    # which mounts other control routes too: only ssw can reach a worker's socket,
    # and the gateway relays none of them (routes.py).
    dev = {SLEEP_DEV_MODE: "1"} if sleep else {}
    lora = {RUNTIME_LORA: "1"} if spec.lora is not None else {}
    env = {
        **store,
        **dev,
        **lora,
        **cfg.vllm.env,
        **spec.env,
        # Bus order makes the index mean the same device to CUDA and to NVML.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": devices,
        # The account has no home: caches go where they survive restarts.
        "HOME": cache,
        "XDG_CACHE_HOME": cache,
        "VLLM_CACHE_ROOT": f"{cache}/vllm",
        "TORCHINDUCTOR_CACHE_DIR": f"{cache}/torchinductor",
        "TRITON_CACHE_DIR": f"{cache}/triton",
        # Workers serve what is on disk; they never reach out to a model hub.
        "HF_HUB_OFFLINE": "1",
        ENV_MODEL: spec.name,
        ENV_REPLICA: str(replica),
        ENV_SOCKET: str(socket),
        ENV_GPU: devices,
        ENV_BUDGET: str(budget_bytes),
        ENV_SLEEP: "1" if sleep else "0",
        "PYTHONUNBUFFERED": "1",
        **(WORKER_OTEL_ENV if cfg.tracing.worker_spans and cfg.tracing.otlp_endpoint else {}),
        **(rank_env(part) if part is not None else {}),
    }
    argv = tuple(vllm_argv(cfg, spec, socket, budget_bytes, gpu_total_bytes, kv_bytes, len(gpus), sleep, part))
    reach = worker_reach(cfg.tracing)
    if part is not None:
        # Its rank traffic (torch.distributed, vLLM's message queues) goes to the group's
        # hosts on ports chosen at run time: those addresses, and no others.
        reach = (*(reach or ()), *part.addresses)
    if part is None:
        description = f"ssw vLLM worker for {spec.name} (replica {replica}, GPU {devices})"
    else:
        role = "head, serving" if part.rank == 0 else "headless"
        description = (
            f"ssw vLLM rank {part.rank} of {spec.name} across {part.span.hosts} hosts ({role}; group "
            f"{part.group.describe()}; GPU {devices})"
        )
    return WorkerUnit(
        name=unit,
        description=description,
        argv=argv,
        env=env,
        slice=cfg.workers.slice,
        user=cfg.workers.user,
        stop_timeout_s=cfg.workers.stop_timeout_s,
        memory_max_bytes=parse_size(cfg.workers.memory_max) if cfg.workers.memory_max else None,
        log_extra={"SSW_MODEL": spec.name, "SSW_REPLICA": str(replica)},
        socket_dir=socket.parent,
        cache_directory=cache_directory(spec.name),
        devices=(*device_nodes, *NVIDIA_CONTROL_DEVICES) if device_nodes else (),
        limit_nofile=cfg.workers.limit_nofile,
        tmp_binds=tuple(sorted({d for arg in argv if (d := _tmp_root(arg))})),
        reach=reach,
    )


def rank_env(part: RankPart) -> dict[str, str]:
    return {
        # The address this host's ranks announce to the others (vLLM would take the
        # first non-loopback one, which need not be on the fleet's network).
        "VLLM_HOST_IP": part.address,
        ENV_RANK: str(part.rank),
        ENV_GROUP: part.group.id,
        # torch.distributed binds to an interface, by default the host name's (often
        # loopback): gloo's and NCCL's bootstrap are told the fleet address's.
        **({"GLOO_SOCKET_IFNAME": part.interface, "NCCL_SOCKET_IFNAME": part.interface} if part.interface else {}),
    }


# vLLM's exporter speaks gRPC unless told otherwise; ssw's endpoint is OTLP over HTTP.
WORKER_OTEL_ENV = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "ssw-worker"}


def worker_reach(tracing: TracingSettings) -> tuple[str, ...] | None:
    """The addresses a worker may reach besides loopback (its OTLP endpoint's), or None:
    it keeps its private network."""
    if not (tracing.worker_spans and tracing.otlp_endpoint):
        return None
    host = urllib.parse.urlsplit(tracing.otlp_endpoint).hostname or ""
    return () if host == "localhost" else (host,)


def _tmp_root(arg: str) -> str | None:
    """The top directory under /tmp or /var/tmp of a path on the command line (a
    checkout there, as CI may clone one), which the worker's private /tmp would
    hide: it is bound into it read-only."""
    for tmp in ("/tmp/", "/var/tmp/"):
        if arg.startswith(tmp) and (top := arg[len(tmp) :].split("/", 1)[0]) not in ("", ".", ".."):
            return tmp + top
    return None
