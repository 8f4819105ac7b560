"""The loader's admin API, from the CLI: the admin token from its file, errors
turned into one line and an exit code, /status read through the typed contract."""

from __future__ import annotations

import json
from typing import Any

from ssw.cli.exits import EXIT_ERROR, EXIT_LOAD_FAILED, EXIT_NOT_FOUND, EXIT_UNREACHABLE, CliError
from ssw.common.contract import CONTRACT_VERSION, Status
from ssw.config import Config


def admin(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    import urllib.error
    import urllib.request

    from ssw.common.auth import read_token

    url = f"http://{cfg.admin.host}:{cfg.admin.port}{path}"
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    token = read_token(cfg.auth.admin_token_file)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        if exc.code == 401:
            message += (
                f" (cannot read {cfg.auth.admin_token_file}? operators need to be in group {cfg.auth.admin_group})"
            )
        code = {404: EXIT_NOT_FOUND, 503: EXIT_LOAD_FAILED}.get(exc.code, EXIT_ERROR)
        raise CliError(message, code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(
            f"cannot reach the loader at {url}: {reason} (is ssw-loader running? systemctl status ssw-loader)",
            EXIT_UNREACHABLE,
        ) from None


def status(cfg: Config) -> Status:
    """GET /status, read through the loader's typed contract."""
    from pydantic import ValidationError

    raw = admin(cfg, "GET", "/status")
    try:
        return Status.model_validate(raw)
    except ValidationError as exc:
        raise CliError(
            f"the loader's /status does not match this ssw's contract (version {CONTRACT_VERSION}): "
            f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}; are ssw and the loader the same version?",
            EXIT_ERROR,
        ) from None
