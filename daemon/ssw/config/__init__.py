"""The one validated configuration model of ssw (``/etc/ssw/config.yaml``).

Every setting has a default and a description; ``ssw config`` prints them and
``etc/ssw/config.yaml`` documents them for operators. An invalid file fails with
the dotted path of the failing key. The sections are in :mod:`ssw.config.sections`,
the gateway's in :mod:`ssw.config.gateway`.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from ssw.config.gateway import MAX_DEADLINE_MS, GatewaySettings, NotLoaded
from ssw.config.sections import (
    MAX_SOCKET_PATH,
    SOCKET_DIR_NAME_MAX,
    SOCKET_NAME,
    AuthSettings,
    BatchSettings,
    FleetSettings,
    GpuSettings,
    HealthSettings,
    LimitSettings,
    Listen,
    PlacementSettings,
    PullSettings,
    SimulatedGpu,
    SystemdSettings,
    TracingSettings,
    VllmSettings,
    WorkerSettings,
    _Section,
)
from ssw.errors import ConfigError

__all__ = [
    "MAX_DEADLINE_MS",
    "MAX_SOCKET_PATH",
    "SOCKET_DIR_NAME_MAX",
    "SOCKET_NAME",
    "AuthSettings",
    "BatchSettings",
    "Config",
    "FleetSettings",
    "GatewaySettings",
    "GpuSettings",
    "HealthSettings",
    "LimitSettings",
    "Listen",
    "NotLoaded",
    "PlacementSettings",
    "PullSettings",
    "SimulatedGpu",
    "SystemdSettings",
    "TracingSettings",
    "VllmSettings",
    "WorkerSettings",
    "load_config",
]


class Config(_Section):
    public: Listen = Field(
        default=Listen(host="0.0.0.0", port=8000), description="The OpenAI API (gateway) listens here."
    )
    admin: Listen = Field(
        default=Listen(host="127.0.0.1", port=8001), description="The admin API (loader) listens here; loopback only."
    )
    models_dir: Path = Field(default=Path("/data/models"), description="Directory scanned for models.")
    models_file: Path = Field(
        default=Path("/etc/ssw/models.yaml"), description="Overrides per model (aliases, pinning, VRAM, args)."
    )
    state_dir: Path = Field(default=Path("/var/lib/ssw"), description="Where measured facts are kept.")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis for request metrics.")
    gpus: GpuSettings = Field(default_factory=GpuSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    systemd: SystemdSettings = Field(default_factory=SystemdSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    pulls: PullSettings = Field(default_factory=PullSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")

    @field_validator("admin")
    @classmethod
    def _admin_on_loopback(cls, value: Listen) -> Listen:
        if not ipaddress.ip_address(value.host).is_loopback:
            raise ValueError("the admin API may only listen on a loopback address")
        return value

    def resolve_relative(self, base: Path) -> Config:
        """Paths in a config file are relative to the file's directory."""
        updates: dict[str, Any] = {}
        for key in ("models_dir", "models_file", "state_dir"):
            path: Path = getattr(self, key)
            if not path.is_absolute():
                updates[key] = (base / path).resolve()
        auth_paths = {
            key: (base / getattr(self.auth, key)).resolve()
            for key in ("keys_file", "admin_token_file", "gateway_token_file")
            if not getattr(self.auth, key).is_absolute()
        }
        if not self.batch.dir.is_absolute():
            updates["batch"] = self.batch.model_copy(update={"dir": (base / self.batch.dir).resolve()})
        if auth_paths:
            updates["auth"] = self.auth.model_copy(update=auth_paths)
        if not self.vllm.python.is_absolute() and len(self.vllm.python.parts) > 1:
            # normpath, not resolve: a venv's python is a symlink that must stay one.
            updates["vllm"] = self.vllm.model_copy(update={"python": Path(os.path.normpath(base / self.vllm.python))})
        return self.model_copy(update=updates)


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {key}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: (top level): must be a mapping")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(p))) from exc
    return cfg.resolve_relative(p.parent.resolve())
