"""The ``ssw`` command: runs the roles in the foreground and talks to a running
loader for operators. Errors are one line on stderr with a distinct exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.parse
from typing import Any

from .config import Config, load_config
from .errors import ConfigError, SswError

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 4
EXIT_UNREACHABLE = 5
EXIT_LOAD_FAILED = 6

DEFAULT_CONFIG = "/etc/ssw/config.yaml"


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return Config()
    return load_config(path or DEFAULT_CONFIG)


def _setup_logging(level: str) -> None:
    # Under systemd, journald adds timestamps and the unit name itself.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def _run_roles(cfg: Config, roles: set[str]) -> int:
    from . import service

    _setup_logging(cfg.log_level)
    try:
        import uvloop
    except ImportError:  # uvloop is optional; asyncio's own loop works too
        return int(asyncio.run(service.run(cfg, roles)))
    return int(uvloop.run(service.run(cfg, roles)))


# --- operator verbs (admin API clients) ------------------------------------------------


def _admin(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    import urllib.error
    import urllib.request

    url = f"http://{cfg.admin.host}:{cfg.admin.port}{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        code = {404: EXIT_NOT_FOUND, 503: EXIT_LOAD_FAILED}.get(exc.code, EXIT_ERROR)
        raise CliError(message, code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the loader at {url}: {reason}", EXIT_UNREACHABLE) from None


def _gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e9:.1f} GB"


def _print_status(st: dict[str, Any]) -> None:
    print(
        f"ssw {st['version']}  up {st['uptime_s']:.0f} s  GPU source: {st['gpu_source']}  "
        f"placement: {st['placement_policy']}  evictions: {st['evictions_total']}"
    )
    for g in st["gpus"]:
        util = "unknown" if g["utilization_pct"] is None else f"{g['utilization_pct']} %"
        print(
            f"  GPU {g['index']} {g['name']}{' (simulated)' if g['simulated'] else ''}: "
            f"total {_gb(g['memory_total_bytes'])}, used {_gb(g['memory_used_bytes'])}, "
            f"reserved {_gb(g['memory_reserved_bytes'])}, free {_gb(g['memory_free_bytes'])}, util {util}"
        )
    print("workers:" if st["workers"] else "workers: none")
    for w in st["workers"]:
        gpus = ",".join(str(g) for g in w["gpus"])
        print(
            f"  {w['unit']}: {w['state']} on GPU {gpus}, port {w['port']}, budget {_gb(w['vram_budget_bytes'])}, "
            f"measured {_gb(w['vram_measured_bytes'])}, up {w['uptime_s']:.0f} s, idle {w['idle_s']:.0f} s"
            + (", pinned" if w["pinned"] else "")
        )
    print("models:")
    for name, m in st["models"].items():
        flags = ", ".join(filter(None, ["pinned" if m["pinned"] else "", "loading" if m["loading"] else ""]))
        aliases = f" (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
        print(f"  {name}{aliases}{' [' + flags + ']' if flags else ''}")
        load = "unknown" if m["load_seconds"] is None else f"{m['load_seconds']:.0f} s"
        print(
            f"    needs {_gb(m['vram_need_bytes'])} per GPU ({m['vram_need_source']}), "
            f"measured {_gb(m['measured_vram_bytes'])}, load time {load}"
        )
        if m.get("cooldown_s"):
            print(f"    refused for {m['cooldown_s']:.0f} s more after a failed load")
        if m.get("last_error"):
            print(f"    last error: {m['last_error']}")
    for name, path in st.get("missing", {}).items():
        print(f"  {name}: configured, files missing at {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssw", description="systemd-native model serving")
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("SSW_CONFIG"),
        help=f"config file (default: $SSW_CONFIG or {DEFAULT_CONFIG})",
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("gateway", help="run the public OpenAI gateway")
    sub.add_parser("loader", help="run the loader (admin API, workers)")
    sub.add_parser("serve", help="run gateway and loader in one process (development, demo)")
    p_status = sub.add_parser("status", help="GPUs, workers and models")
    p_status.add_argument("--json", action="store_true")
    p_load = sub.add_parser("load", help="load a model (waits until it is ready)")
    p_load.add_argument("model")
    p_load.add_argument("--no-wait", action="store_true")
    p_unload = sub.add_parser("unload", help="stop a model's workers")
    p_unload.add_argument("model")
    p_logs = sub.add_parser("logs", help="the last lines of a worker's journal")
    p_logs.add_argument("model")
    p_logs.add_argument("-n", "--lines", type=int, default=100)
    p_logs.add_argument("--replica", type=int, default=1)
    p_cfg = sub.add_parser("config", help="validate the config and print it with defaults")
    p_cfg.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    try:
        cfg = _config(args)
        if args.verb in ("gateway", "loader", "serve"):
            roles = {"gateway", "loader"} if args.verb == "serve" else {args.verb}
            return _run_roles(cfg, roles)
        if args.verb == "config":
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        elif args.verb == "status":
            st = _admin(cfg, "GET", "/status")
            print(json.dumps(st, indent=2)) if args.json else _print_status(st)
        elif args.verb == "load":
            res = _admin(
                cfg,
                "POST",
                "/load",
                {"model": args.model, "wait": not args.no_wait},
                timeout=cfg.health.start_timeout_s + 30,
            )
            units = ", ".join(w["unit"] for w in res.get("workers", []))
            print(f"{res['model']}: {res['state']}{' (' + units + ')' if units else ''}")
        elif args.verb == "unload":
            res = _admin(cfg, "POST", "/unload", {"model": args.model}, timeout=cfg.workers.stop_timeout_s + 30)
            print(f"{res['model']}: stopped {', '.join(res['stopped'])}")
        elif args.verb == "logs":
            model = urllib.parse.quote(args.model, safe="")
            res = _admin(cfg, "GET", f"/logs/{model}?lines={args.lines}&replica={args.replica}")
            print("\n".join(res["lines"]))
    except ConfigError as exc:
        print(f"ssw: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CliError as exc:
        print(f"ssw: {exc}", file=sys.stderr)
        return exc.code
    except SswError as exc:
        print(f"ssw: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
