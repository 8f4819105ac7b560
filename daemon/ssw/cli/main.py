"""The ``ssw`` command: runs the roles in the foreground and talks to a running
loader for operators. Errors are one line on stderr with a distinct exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import urllib.parse
from typing import Any

from ssw.common.contract import CONTRACT_VERSION, Status
from ssw.common.states import LIVE
from ssw.config import Config, load_config
from ssw.errors import ConfigError, SswError

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


def _run_roles(cfg: Config, roles: set[str], config_path: str | None) -> int:
    from ssw import service

    _setup_logging(cfg.log_level)
    try:
        import uvloop
    except ImportError:  # uvloop is optional; asyncio's own loop works too
        return int(asyncio.run(service.run(cfg, roles, config_path)))
    return int(uvloop.run(service.run(cfg, roles, config_path)))


# --- operator verbs (admin API clients) ------------------------------------------------


def _admin(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
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


def _status(cfg: Config) -> Status:
    """GET /status, read through the loader's typed contract."""
    from pydantic import ValidationError

    raw = _admin(cfg, "GET", "/status")
    try:
        return Status.model_validate(raw)
    except ValidationError as exc:
        raise CliError(
            f"the loader's /status does not match this ssw's contract (version {CONTRACT_VERSION}): "
            f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}; are ssw and the loader the same version?",
            EXIT_ERROR,
        ) from None


def _gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e9:.1f} GB"


def _bar(used: int, reserved: int, total: int, width: int = 24) -> str:
    """[######++......] : '#' in use, '+' reserved by loads in flight, '.' free."""
    if total <= 0:
        return ""
    u = min(round(used / total * width), width)
    r = min(round(reserved / total * width), width - u)
    return "[" + "#" * u + "+" * r + "." * (width - u - r) + "]"


def _when(deadline: float | None) -> str:
    if deadline is None:
        return ""
    left = deadline - time.time()
    return f" until {time.strftime('%H:%M:%S', time.localtime(deadline))} ({max(left, 0):.0f} s)"


def _print_status(st: Status) -> None:
    print(
        f"ssw {st.ssw_version}  up {st.uptime_s:.0f} s  GPU source: {st.gpu_source}  "
        f"placement: {st.placement_policy}  evictions: {st.evictions_total}"
    )
    for g in st.gpus:
        util = "unknown" if g.utilization_pct is None else f"{g.utilization_pct} %"
        bar = _bar(g.memory_used_bytes, g.memory_reserved_bytes, g.memory_total_bytes)
        releasing = f", releasing {_gb(g.memory_releasing_bytes)}" if g.memory_releasing_bytes else ""
        print(
            f"  GPU {g.index} {g.name}{' (simulated)' if g.simulated else ''} {bar} "
            f"total {_gb(g.memory_total_bytes)}, used {_gb(g.memory_used_bytes)}, "
            f"reserved {_gb(g.memory_reserved_bytes)}{releasing}, free {_gb(g.memory_free_bytes)}, util {util}"
        )
    print("workers:" if st.workers else "workers: none")
    for w in st.workers:
        gpus = ",".join(str(g) for g in w.gpus)
        print(
            f"  {w.unit}: {w.state.value} on GPU {gpus} for {w.state_for_s:.0f} s, budget {_gb(w.vram_budget_bytes)}, "
            f"measured {_gb(w.vram_measured_bytes)}, up {w.uptime_s:.0f} s, idle {w.idle_s:.0f} s"
            + (", pinned" if w.pinned else "")
            + (f", asleep at level {w.sleep_level or '?'}" if w.state == "sleeping" else "")
            + (f", host memory {_gb(w.ram_bytes)}" if w.state == "sleeping" and w.ram_bytes else "")
            + (f", adapters {', '.join(w.adapters)}" if w.adapters else "")
        )
        if w.state_reason:
            print(f"    {w.state_reason}")
    print("models:")
    for name, m in st.models.items():
        rec = m.load
        flags = ", ".join(filter(None, ["pinned" if m.pinned else "", "" if rec.state == "idle" else rec.state]))
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        print(f"  {name}{aliases}{' [' + flags + ']' if flags else ''}")
        load = "unknown" if m.load_seconds is None else f"{m.load_seconds:.0f} s"
        print(
            f"    needs {_gb(m.vram_need_bytes)} per GPU ({m.vram_need_source}), "
            f"measured {_gb(m.measured_vram_bytes)}, load time {load}"
        )
        if rec.state != "idle":
            print(f"    load {rec.state.value}{_when(rec.deadline)}: {rec.reason}")
        if rec.last_error:
            print(f"    last error: {rec.last_error}")
    for name, path in st.missing.items():
        print(f"  {name}: configured, files missing at {path}")


def _print_stats(st: dict[str, Any]) -> None:
    print(f"last {st['window_s']:.0f} s")
    if not st["models"]:
        print("  no requests")
    for name, m in st["models"].items():
        lat, ttft = m["latency_ms"], m["ttft_ms"]
        print(
            f"  {name}: {m['requests']} requests, {m['errors']} errors ({m['error_rate'] * 100:.1f} %), "
            f"latency p50/p95/p99 {lat['p50']}/{lat['p95']}/{lat['p99']} ms, "
            f"TTFT p50/p95/p99 {ttft['p50']}/{ttft['p95']}/{ttft['p99']} ms, "
            f"tokens/s in {m['prompt_tokens_per_s']} out {m['completion_tokens_per_s']}"
        )


def _load(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "wait": False}
    if args.gpu is not None:
        body["gpu"] = args.gpu
    res: dict[str, Any] = _admin(cfg, "POST", "/load", body)
    if not args.wait:
        return res
    # Show progress while the model loads: the worker states and elapsed time.
    started, last = time.monotonic(), ""
    deadline = started + cfg.health.start_timeout_s + 30
    while time.monotonic() < deadline:
        st = _status(cfg)
        entry = st.models.get(res["model"])
        rec = entry.load if entry else None
        workers = [w for w in st.workers if w.model == res["model"] and w.state in LIVE]
        line = ", ".join(f"{w.unit} {w.state.value}" for w in workers) or "placing"
        if rec is not None and rec.state == "backing_off":
            line += f"; retrying{_when(rec.deadline)} after: {rec.last_error}"
        idle = rec is None or rec.state in ("idle", "cooling_down")
        if workers and all(w.state == "ready" for w in workers) and idle:
            if not args.json:
                print(f"\r{res['model']}: ready in {time.monotonic() - started:.0f} s ({line})" + " " * 10)
            return {"model": res["model"], "state": "ready", "workers": [w.model_dump(mode="json") for w in workers]}
        if idle and not workers:
            why = (rec.last_error or rec.reason) if rec else "unknown"
            raise CliError(f"loading {res['model']} failed: {why}", EXIT_LOAD_FAILED)
        if not args.json and sys.stdout.isatty():
            print(f"\r{res['model']}: {line}, {time.monotonic() - started:.0f} s" + " " * 10, end="", flush=True)
        elif not args.json and line != last:
            print(f"{res['model']}: {line}", flush=True)
        last = line
        time.sleep(0.5)
    raise CliError(f"{res['model']} did not become ready in time", EXIT_LOAD_FAILED)


def _pull(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    repo, _, revision = args.source.partition("@")
    body: dict[str, Any] = {"repo": repo, "revision": revision or "main"}
    if args.name:
        body["name"] = args.name
    job: dict[str, Any] = _admin(cfg, "POST", "/pull", body, timeout=120)
    if not args.json:
        total = job["bytes_total"] / 1e9
        print(f"{job['id']}: {repo}@{job['revision']} ({job['commit']}) as {job['name']}, {total:.2f} GB", flush=True)
    if not args.wait:
        return job
    last = ""
    while job["status"] in ("queued", "running"):
        time.sleep(1.0)
        job = _admin(cfg, "GET", f"/jobs/{job['id']}")
        line = f"{job['status']}: {job['bytes_done'] / 1e9:.2f} of {job['bytes_total'] / 1e9:.2f} GB"
        if not args.json and line != last:
            end = "" if sys.stdout.isatty() else "\n"
            print(("\r" if sys.stdout.isatty() else "") + line + " " * 8, end=end, flush=True)
        last = line
    if not args.json and sys.stdout.isatty():
        print()
    if job["status"] != "succeeded":
        raise CliError(f"pull of {job['name']} {job['status']}: {job['error']}", EXIT_LOAD_FAILED)
    if not args.json:
        print(f"{job['name']}: in the models dir, servable now")
    return job


async def _fleet_status(cfg: Config) -> dict[str, Any]:
    from ssw.gateway.fleet import FleetView

    if not cfg.fleet.enabled:
        raise CliError("this host is in no fleet (fleet.redis_url is not set)", EXIT_USAGE)
    view = FleetView(cfg.fleet, lambda: None)
    try:
        await view.refresh()
        if not view.connected:
            raise CliError(f"the fleet's Redis cannot be reached: {view.last_error}", EXIT_UNREACHABLE)
        return {"hosts": {name: record.model_dump(mode="json") for name, record in sorted(view.hosts.items())}}
    finally:
        await view.close()


def _print_fleet(out: dict[str, Any]) -> None:
    now = time.time()
    for name, h in out["hosts"].items():
        print(f"{name}  {h['url']}  heard {now - h['at']:.1f} s ago")
        for g in h["gpus"]:
            used = g["memory_total_bytes"] - g["memory_free_bytes"]
            print(
                f"  GPU {g['index']} {g['name']}: {_bar(used, 0, g['memory_total_bytes'])} "
                f"{_gb(used)}/{_gb(g['memory_total_bytes'])}"
            )
        for w in h["workers"]:
            print(f"  {w['unit']:<40} {w['state']:<10} GPU {','.join(map(str, w['gpus']))}")
        if not h["workers"]:
            print("  (no workers)")


async def _batches(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    from ssw.batch.app import batch_view
    from ssw.batch.states import BatchStatus
    from ssw.batch.store import BatchStore

    store = BatchStore(cfg.redis_url, cfg.batch.dir, cfg.batch.retain_s)
    try:
        if args.batch is None:
            records = await store.list_batches(None, None, args.limit)
        else:
            record = await store.batch(args.batch)
            if record is None:
                raise CliError(f"no batch {args.batch}", EXIT_NOT_FOUND)
            if args.cancel and not await store.move_batch(args.batch, BatchStatus.CANCELLING):
                raise CliError(f"batch {args.batch} is {record['status']}: it cannot be cancelled", EXIT_ERROR)
            records = [await store.batch(args.batch) or record]
        return {"data": [{**batch_view(r), "owner": r.get("owner", "")} for r in records[: args.limit]]}
    finally:
        await store.close()


def _logs(cfg: Config, args: argparse.Namespace) -> None:
    model = urllib.parse.quote(args.model, safe="")
    seen: list[str] = []
    while True:
        res = _admin(cfg, "GET", f"/logs/{model}?lines={args.lines}&replica={args.replica}")
        lines: list[str] = res["lines"]
        # Print what follows the last line already printed.
        start = 0
        if seen and seen[-1] in lines:
            start = len(lines) - lines[::-1].index(seen[-1])
        for line in lines[start:]:
            print(line, flush=True)
        seen = lines
        if not args.follow:
            return
        time.sleep(1.0)


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

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    verb("status", "GPUs, workers and models").add_argument(
        "--fleet", action="store_true", help="every host of the fleet (from the fleet's Redis)"
    )
    verb("models", "the models and aliases on this host")
    p_load = verb("load", "load a model")
    p_load.add_argument("model")
    p_load.add_argument("--gpu", type=int, help="place it on this GPU")
    p_load.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until ready, showing progress (default)",
    )
    verb("unload", "stop a model's workers (or one worker, by its unit name)").add_argument("model")
    p_pull = verb("pull", "download a model from the hub into the models dir (a job of the loader)")
    p_pull.add_argument("source", metavar="REPO[@REVISION]")
    p_pull.add_argument("--name", help="model name and directory (default: the repo's name)")
    p_pull.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=True, help="follow it to the end (default)"
    )
    verb("jobs", "the loader's pull jobs")
    verb("cancel", "cancel a pull (its partial data is removed)").add_argument("job")
    p_logs = verb("logs", "a worker's journal")
    p_logs.add_argument("model")
    p_logs.add_argument("-n", "--lines", type=int, default=100)
    p_logs.add_argument("-f", "--follow", action="store_true")
    p_logs.add_argument("--replica", type=int, default=1)
    p_batches = verb("batches", "batches of every API key (from Redis), newest first; or one batch")
    p_batches.add_argument("batch", nargs="?", help="a batch id: show it")
    p_batches.add_argument("--cancel", action="store_true", help="cancel that batch")
    p_batches.add_argument("--limit", type=int, default=50)
    verb("stats", "request statistics from Redis").add_argument("--window", default="5m", help="e.g. 30s, 5m, 1h")
    verb("check-config", "validate the config and models.yaml and print the resolved registry")
    verb("config", "print the effective config with defaults")
    p_keys = sub.add_parser("keys", help="API keys of the public API")
    keys_sub = p_keys.add_subparsers(dest="keys_verb", required=True)
    k_add = keys_sub.add_parser("add", help="create a key (printed once)")
    k_add.add_argument("name")
    k_add.add_argument("--models", help="comma-separated models or aliases it may use (default: all)")
    k_add.add_argument("--max-in-flight", type=int)
    k_add.add_argument(
        "--not-loaded",
        choices=("wait", "accept", "unavailable"),
        help="what this key's requests get while their model is not ready (default: gateway.not_loaded)",
    )
    keys_sub.add_parser("revoke", help="delete a key").add_argument("name")
    keys_sub.add_parser("list", help="key names and scopes (never the keys)")
    args = parser.parse_args(argv)

    try:
        cfg = _config(args)
        if args.verb in ("gateway", "loader", "serve"):
            roles = {"gateway", "loader"} if args.verb == "serve" else {args.verb}
            path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
            return _run_roles(cfg, roles, path)
        out: Any = None
        if args.verb == "keys":
            return _keys(cfg, args)
        if args.verb == "config":
            out = cfg.model_dump(mode="json")
            if not args.json:
                print(json.dumps(out, indent=2))
        elif args.verb == "check-config":
            out = _check_config(cfg)
            if not args.json:
                for name, m in out["models"].items():
                    aliases = f" (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
                    print(
                        f"{name}{aliases}: {m['path']}, {_gb(m['weight_bytes'])} weights, "
                        f"needs {_gb(m['vram_need_bytes'])} per GPU ({m['vram_need_source']})"
                        + (", pinned" if m["pinned"] else "")
                    )
                for name, path in out["missing"].items():
                    print(f"{name}: configured, files missing at {path}")
                print(f"config and models.yaml are valid: {len(out['models'])} models, {len(out['missing'])} missing")
        elif args.verb == "status" and args.fleet:
            out = asyncio.run(_fleet_status(cfg))
            if not args.json:
                _print_fleet(out)
        elif args.verb == "status":
            status = _status(cfg)
            out = status.model_dump(mode="json")
            if not args.json:
                _print_status(status)
        elif args.verb == "models":
            status = _status(cfg)
            out = {
                name: {
                    "aliases": m.aliases,
                    "pinned": m.pinned,
                    "ready": any(w.model == name and w.state == "ready" for w in status.workers),
                    "load": m.load.state.value,
                }
                for name, m in status.models.items()
            }
            if not args.json:
                for name, m in out.items():
                    aliases = f" (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
                    print(
                        f"{name}{aliases}: {'ready' if m['ready'] else 'not loaded'}"
                        + (", pinned" if m["pinned"] else "")
                    )
        elif args.verb == "load":
            out = _load(cfg, args)
            if not args.json and not args.wait:
                print(f"{out['model']}: {out['state']}")
        elif args.verb == "unload":
            field = "unit" if args.model.startswith("ssw-worker@") else "model"
            body = {field: args.model}
            out = _admin(cfg, "POST", "/unload", body, timeout=cfg.workers.stop_timeout_s + 30)
            if not args.json:
                print(f"{out[field]}: stopped {', '.join(out['stopped'])}")
        elif args.verb == "pull":
            out = _pull(cfg, args)
        elif args.verb == "jobs":
            out = _admin(cfg, "GET", "/jobs")
            if not args.json:
                for j in out["jobs"]:
                    print(
                        f"{j['id']} {j['status']:<9} {j['name']} <- {j['repo']}@{j['revision']} "
                        f"{j['bytes_done'] / 1e9:.2f}/{j['bytes_total'] / 1e9:.2f} GB {j['created_at']}"
                        + (f": {j['error']}" if j["error"] else "")
                    )
        elif args.verb == "cancel":
            out = _admin(cfg, "DELETE", f"/jobs/{urllib.parse.quote(args.job, safe='')}")
            if not args.json:
                print(f"{out['id']}: {out['status']}")
        elif args.verb == "logs":
            if args.json:
                model = urllib.parse.quote(args.model, safe="")
                out = _admin(cfg, "GET", f"/logs/{model}?lines={args.lines}&replica={args.replica}")
            else:
                _logs(cfg, args)
        elif args.verb == "batches":
            out = asyncio.run(_batches(cfg, args))
            if not args.json:
                for b in out["data"]:
                    counts = b["request_counts"]
                    print(
                        f"{b['id']} {b['status']:<11} key={b['owner'] or '-'} {b['endpoint']} "
                        f"{counts['completed']} completed, {counts['failed']} failed of {counts['total']}, "
                        f"created {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(b['created_at']))}"
                        + (f" output={b['output_file_id']}" if b["output_file_id"] else "")
                        + (f" errors={b['error_file_id']}" if b["error_file_id"] else "")
                    )
        elif args.verb == "stats":
            out = _admin(cfg, "GET", f"/stats?window={urllib.parse.quote(args.window)}")
            if not args.json:
                _print_stats(out)
        if args.json and out is not None:
            print(json.dumps(out, indent=2))
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


def _keys(cfg: Config, args: argparse.Namespace) -> int:
    from ssw.common import auth
    from ssw.common.contract import valid_name

    path = cfg.auth.keys_file
    entries = auth.load_raw(path)
    if args.keys_verb == "list":
        for name, existing in sorted(entries.items()):
            models = existing.get("models")
            scope = ", ".join(str(m) for m in models) if isinstance(models, list) else "all models"
            print(f"{name}: {scope}")
        return EXIT_OK
    if not valid_name(args.name):
        raise CliError(f"invalid key name {args.name!r}", EXIT_USAGE)
    if args.keys_verb == "add":
        if args.name in entries:
            raise CliError(f"a key named {args.name} exists; revoke it first", EXIT_ERROR)
        secret = auth.new_secret()
        entry: dict[str, object] = {"sha256": auth.digest(secret), "created": int(time.time())}
        if args.models:
            entry["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.max_in_flight:
            entry["max_in_flight"] = args.max_in_flight
        if args.not_loaded:
            entry["not_loaded"] = args.not_loaded
        entries[args.name] = entry
        auth.write_keys(path, entries, cfg.auth.gateway_group)
        print(secret)
        print(f"ssw: key {args.name} added; it is shown only now", file=sys.stderr)
        return EXIT_OK
    if args.name not in entries:
        raise CliError(f"no key named {args.name}", EXIT_NOT_FOUND)
    del entries[args.name]
    auth.write_keys(path, entries, cfg.auth.gateway_group)
    print(f"ssw: key {args.name} revoked; the gateway drops it within 2 s", file=sys.stderr)
    return EXIT_OK


def _check_config(cfg: Config) -> dict[str, Any]:
    from ssw.loader.decide.vram import vram_need
    from ssw.loader.models.registry import scan

    reg = scan(cfg.models_dir, cfg.models_file)
    models = {}
    for name, spec in sorted(reg.models.items()):
        need = vram_need(spec, cfg.placement)
        models[name] = {
            "path": str(spec.path),
            "aliases": list(spec.aliases),
            "pinned": spec.pinned,
            "weight_bytes": spec.facts.weight_bytes,
            "vram_need_bytes": need.per_gpu(1),
            "vram_need_source": need.source,
        }
    return {"models": models, "aliases": reg.aliases, "missing": {k: str(v) for k, v in reg.missing.items()}}


if __name__ == "__main__":
    sys.exit(main())
