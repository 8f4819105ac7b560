"""API keys for the public API and tokens for the admin API.

Keys are random 256-bit secrets shown once (``ssw keys add NAME``); the file
keeps only their SHA-256, which is the right hash for high-entropy secrets
(nothing to brute-force, and a check costs a microsecond). Each key has a name,
used in logs and metrics instead of the key, and optionally the models or
aliases it may use. The gateway re-reads the file when it changes or on
SIGHUP, so adding or revoking a key needs no restart.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from ssw.common.contract import valid_name
from ssw.errors import ConfigError, SswError

log = logging.getLogger(__name__)
KEY_PREFIX = "ssw-"


class Unauthorized(SswError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(SswError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


NOT_LOADED_MODES = ("wait", "accept", "unavailable")


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str
    models: tuple[str, ...] | None  # None: every model
    max_in_flight: int | None = None
    not_loaded: str | None = None  # None: gateway.not_loaded
    pull: bool = False  # may start pulls from the hub (Ollama's /api/pull)
    keep_alive: bool = True  # may set a model's keep_alive (Ollama's), 0 (unload) included
    operator: bool = False  # may open the live status page (every model, worker and GPU of the host)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def read_keys(path: Path) -> dict[str, ApiKey]:
    """digest -> key. A missing file means no keys (every request is refused)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the API keys: {exc}") from exc
    entries = raw.get("keys", {}) if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: keys: must be a mapping of names to entries")
    out: dict[str, ApiKey] = {}
    for name, entry in entries.items():
        if not valid_name(name) or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ConfigError(f"{path}: keys.{name}: needs a valid name and a sha256")
        models = entry.get("models")
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            raise ConfigError(f"{path}: keys.{name}.models: must be a list of model names or aliases")
        limit = entry.get("max_in_flight")
        not_loaded = entry.get("not_loaded")
        if not_loaded is not None and not_loaded not in NOT_LOADED_MODES:
            raise ConfigError(f"{path}: keys.{name}.not_loaded: must be one of {', '.join(NOT_LOADED_MODES)}")
        flags = {
            flag: entry.get(flag, default)
            for flag, default in (("pull", False), ("keep_alive", True), ("operator", False))
        }
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: keys.{name}.{flag}: must be true or false")
        out[entry["sha256"]] = ApiKey(
            name,
            entry["sha256"],
            tuple(models) if models is not None else None,
            limit if isinstance(limit, int) and limit > 0 else None,
            not_loaded,
            flags["pull"],
            flags["keep_alive"],
            flags["operator"],
        )
    return out


def write_keys(path: Path, keys: dict[str, dict[str, object]], group: str | None = None) -> None:
    """Replace the key file atomically, readable by its owner (and the gateway's group) only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# ssw API keys: managed by `ssw keys`; only SHA-256 digests are stored.\n")
        yaml.safe_dump({"keys": keys}, f, sort_keys=True)
    _share_with_group(tmp, group)
    os.replace(tmp, path)


def _share_with_group(path: Path, group: str | None) -> None:
    """Mode 0640 to the group when it exists, else 0600; explicit, whatever the umask."""
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o640)
            return
        except KeyError:
            pass  # no such group here: owner only
    os.chmod(path, 0o600)


def load_raw(path: Path) -> dict[str, dict[str, object]]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}
    entries = raw.get("keys", {}) if isinstance(raw, dict) else {}
    return dict(entries) if isinstance(entries, dict) else {}


class KeyRing:
    """The gateway's view of the key file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, ApiKey] = {}
        self._stamp: tuple[float, int] | None = None

    def reload(self, force: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if not force and stamp == self._stamp:
            return
        try:
            keys = read_keys(self.path)
        except ConfigError as exc:
            log.error("keeping the previous API keys: %s", exc.message)
            return
        self._keys, self._stamp = keys, stamp
        log.info("API keys loaded from %s: %d keys", self.path, len(keys))

    def __len__(self) -> int:
        return len(self._keys)

    def named(self, name: str) -> ApiKey | None:
        return next((k for k in self._keys.values() if k.name == name), None)

    def check(self, secret: str | None) -> ApiKey:
        """The key whose secret was presented (Authorization: Bearer, or x-api-key)."""
        if secret is None:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
        key = self._keys.get(digest(secret))
        if key is None:
            raise Unauthorized("Invalid API key.")
        return key


def read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (FileNotFoundError, PermissionError):
        return None


def ensure_token(path: Path, group: str | None) -> str:
    """The token in the file, created (random, mode 0640 to the group) when absent."""
    token = read_token(path)
    if token:
        return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    _share_with_group(path, group)
    log.info("created %s", path)
    return token


def token_matches(header: str | None, tokens: list[str]) -> bool:
    presented = bearer(header)
    return presented is not None and any(hmac.compare_digest(presented, t) for t in tokens)
