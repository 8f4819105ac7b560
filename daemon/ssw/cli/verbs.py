"""The ``ssw`` verbs, one function each: ``(cfg, args)`` in, the verb's data out
(printed as JSON with ``--json``; each verb prints its own text otherwise), or an
exit code for the verbs that run the roles or edit keys."""

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

from ssw.cli.admin import admin, status
from ssw.cli.exits import EXIT_ERROR, EXIT_LOAD_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from ssw.cli.printing import gb, print_fleet, print_stats, print_status, when
from ssw.common.states import LIVE
from ssw.config import Config

DEFAULT_CONFIG = "/etc/ssw/config.yaml"


def setup_logging(level: str) -> None:
    # Under systemd, journald adds timestamps and the unit name itself.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def run_roles(cfg: Config, args: argparse.Namespace) -> int:
    """gateway, loader, or serve (both in one process): in the foreground until stopped."""
    from ssw import service

    roles = {"gateway", "loader"} if args.verb == "serve" else {args.verb}
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    setup_logging(cfg.log_level)
    try:
        import uvloop
    except ImportError:  # uvloop is optional; asyncio's own loop works too
        return int(asyncio.run(service.run(cfg, roles, path)))
    return int(uvloop.run(service.run(cfg, roles, path)))


def show_config(cfg: Config, args: argparse.Namespace) -> Any:
    out = cfg.model_dump(mode="json")
    if not args.json:
        print(json.dumps(out, indent=2))
        return None
    return out


def check_config(cfg: Config, args: argparse.Namespace) -> Any:
    out = _check_config(cfg)
    if not args.json:
        for name, m in out["models"].items():
            aliases = f" (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
            print(
                f"{name}{aliases}: {m['path']}, {gb(m['weight_bytes'])} weights, "
                f"needs {gb(m['vram_need_bytes'])} per GPU ({m['vram_need_source']})"
                + (", pinned" if m["pinned"] else "")
            )
        for name, path in out["missing"].items():
            print(f"{name}: configured, files missing at {path}")
        print(f"config and models.yaml are valid: {len(out['models'])} models, {len(out['missing'])} missing")
    return out


def show_status(cfg: Config, args: argparse.Namespace) -> Any:
    if args.fleet:
        out = asyncio.run(_fleet_status(cfg))
        if not args.json:
            print_fleet(out)
        return out
    st = status(cfg)
    if not args.json:
        print_status(st)
    return st.model_dump(mode="json")


def models(cfg: Config, args: argparse.Namespace) -> Any:
    st = status(cfg)
    out: dict[str, dict[str, Any]] = {
        name: {
            "aliases": m.aliases,
            "pinned": m.pinned,
            "ready": any(w.model == name and w.state == "ready" for w in st.workers),
            "load": m.load.state.value,
        }
        for name, m in st.models.items()
    }
    if not args.json:
        for name, m in out.items():
            aliases = f" (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
            print(f"{name}{aliases}: {'ready' if m['ready'] else 'not loaded'}" + (", pinned" if m["pinned"] else ""))
    return out


def load(cfg: Config, args: argparse.Namespace) -> Any:
    out = _load(cfg, args)
    if not args.json and not args.wait:
        print(f"{out['model']}: {out['state']}")
    return out


def unload(cfg: Config, args: argparse.Namespace) -> Any:
    field = "unit" if args.model.startswith("ssw-worker@") else "model"
    out = admin(cfg, "POST", "/unload", {field: args.model}, timeout=cfg.workers.stop_timeout_s + 30)
    if not args.json:
        print(f"{out[field]}: stopped {', '.join(out['stopped'])}")
    return out


def clear_check(cfg: Config, args: argparse.Namespace) -> Any:
    out = admin(cfg, "POST", "/known-answer/clear", {"model": args.model})
    if not args.json:
        done = "cleared: it may sleep again, and its next start records its answer anew"
        print(f"{out['model']}: {done if out['cleared'] else 'nothing to clear'}")
    return out


def pull(cfg: Config, args: argparse.Namespace) -> Any:
    return _pull(cfg, args)


def jobs(cfg: Config, args: argparse.Namespace) -> Any:
    out = admin(cfg, "GET", "/jobs")
    if not args.json:
        for j in out["jobs"]:
            print(
                f"{j['id']} {j['status']:<9} {j['name']} <- {j['repo']}@{j['revision']} "
                f"{j['bytes_done'] / 1e9:.2f}/{j['bytes_total'] / 1e9:.2f} GB {j['created_at']}"
                + (f": {j['error']}" if j["error"] else "")
            )
    return out


def cancel(cfg: Config, args: argparse.Namespace) -> Any:
    out = admin(cfg, "DELETE", f"/jobs/{urllib.parse.quote(args.job, safe='')}")
    if not args.json:
        print(f"{out['id']}: {out['status']}")
    return out


def logs(cfg: Config, args: argparse.Namespace) -> Any:
    if args.json:
        model = urllib.parse.quote(args.model, safe="")
        return admin(cfg, "GET", f"/logs/{model}?lines={args.lines}&replica={args.replica}")
    _logs(cfg, args)
    return None


def batches(cfg: Config, args: argparse.Namespace) -> Any:
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
    return out


def stats(cfg: Config, args: argparse.Namespace) -> Any:
    out = admin(cfg, "GET", f"/stats?window={urllib.parse.quote(args.window)}")
    if not args.json:
        print_stats(out)
    return out


def keys(cfg: Config, args: argparse.Namespace) -> int:
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
        if args.pull:
            entry["pull"] = True
        if args.no_keep_alive:
            entry["keep_alive"] = False
        if args.operator:
            entry["operator"] = True
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


def _load(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "wait": False}
    if args.gpu is not None:
        body["gpu"] = args.gpu
    res: dict[str, Any] = admin(cfg, "POST", "/load", body)
    if not args.wait:
        return res
    # Show progress while the model loads: the worker states and elapsed time.
    started, last = time.monotonic(), ""
    deadline = started + cfg.health.start_timeout_s + 30
    while time.monotonic() < deadline:
        st = status(cfg)
        entry = st.models.get(res["model"])
        rec = entry.load if entry else None
        workers = [w for w in st.workers if w.model == res["model"] and w.state in LIVE]
        line = ", ".join(f"{w.unit} {w.state.value}" for w in workers) or "placing"
        if rec is not None and rec.state == "backing_off":
            line += f"; retrying{when(rec.deadline)} after: {rec.last_error}"
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
    job: dict[str, Any] = admin(cfg, "POST", "/pull", body, timeout=120)
    if not args.json:
        total = job["bytes_total"] / 1e9
        print(f"{job['id']}: {repo}@{job['revision']} ({job['commit']}) as {job['name']}, {total:.2f} GB", flush=True)
    if not args.wait:
        return job
    last = ""
    while job["status"] in ("queued", "running"):
        time.sleep(1.0)
        job = admin(cfg, "GET", f"/jobs/{job['id']}")
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
        res = admin(cfg, "GET", f"/logs/{model}?lines={args.lines}&replica={args.replica}")
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
