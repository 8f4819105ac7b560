"""Worker unit names and the properties of their transient units (pure).

Name scheme: ``ssw-worker@<model>.service`` for a model's first replica,
``ssw-worker@<model>:<n>.service`` for the n-th (n >= 2). The model part is
escaped so that any model name gives a valid unit name and the mapping is
one-to-one: characters outside ``[A-Za-z0-9_.-]`` (':' and '\\' included) become
``\\xNN``, as systemd-escape writes them, so the literal ':' only ever separates
the replica number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadRequest

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


def unit_name(model: str, replica: int = 1) -> str:
    if replica < 1:
        raise ValueError("replica numbers start at 1")
    instance = escape(model) + (f":{replica}" if replica > 1 else "")
    name = f"{UNIT_PREFIX}{instance}{UNIT_SUFFIX}"
    if len(name) > MAX_UNIT_NAME:
        raise BadRequest("model name too long for a unit name")
    return name


def parse_unit_name(name: str) -> tuple[str, int] | None:
    """(model, replica) of one of our worker units; None for any other unit."""
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


@dataclass(frozen=True)
class WorkerUnit:
    """Everything systemd needs to run one worker; built only by the loader."""

    name: str
    description: str
    argv: tuple[str, ...]
    env: dict[str, str]
    slice: str
    user: str | None
    stop_timeout_s: int
    memory_max_bytes: int | None
    log_extra: dict[str, str]
    limit_nofile: int = 65536

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
        ]
        if self.user:
            props.append(("User", ("s", self.user)))
        if self.memory_max_bytes:
            props.append(("MemoryMax", ("t", self.memory_max_bytes)))
        return props


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64G' -> bytes, with systemd's base-1024 suffixes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * 1024**power)
