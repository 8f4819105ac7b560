"""The gateway's memory with many idle keep-alive connections and with many
requests waiting for a load (the SSW gateway-footprint benchmark).

    python bench/gateway_memory.py --api-key KEY --admin-token-file /var/lib/ssw/admin.token \\
        --connections 10000 --waiters 1000 --waiters-model tiny-b --json out.json

Memory and open files are the gateway's own figures from its Prometheus
endpoint (process_resident_memory_bytes, process_open_fds), so this works the
same on a host, in the demo's disposable systemd host, or anywhere the
endpoints can be reached.

1. waiters: the model is unloaded, then W requests with X-SSW-Wait are sent;
   once the gateway reports all W waiting, its RSS is read; then they are
   served by the one load they started. Each waiter holds a connection too.
2. connections: N connections each send one GET /health and then stay open
   and idle (HTTP/1.1 keep-alive); the gateway's RSS is read while all are held.

Waiters go first, on the freshest heap: memory a step frees stays in the
gateway's heap and is reused by the next, which then looks cheaper.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import admin_api
import aiohttp
from prometheus_client.parser import text_string_to_metric_families

MiB = 2**20


async def footprint(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    async with session.get(metrics_url) as resp:
        text = await resp.text()
    wanted = ("process_resident_memory_bytes", "process_open_fds")
    found = {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.name in wanted and f.samples}
    if len(found) != 2:
        sys.exit(f"gateway_memory: {metrics_url} has no process_resident_memory_bytes/process_open_fds")
    return {"rss_bytes": found["process_resident_memory_bytes"], "open_fds": found["process_open_fds"]}


async def settle(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """The footprint once it stops moving (the gateway frees buffers lazily)."""
    last = await footprint(session, metrics_url)
    for _ in range(10):
        await asyncio.sleep(0.5)
        now = await footprint(session, metrics_url)
        if abs(now["rss_bytes"] - last["rss_bytes"]) < 256 * 1024:
            return now
        last = now
    return last


async def open_idle(host: str, port: int, path: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    await reader.readexactly(length)
    return writer


async def connections(session: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    before = await settle(session, args.metrics)
    held: list[asyncio.StreamWriter] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(0, args.connections, args.batch):
        batch = min(args.batch, args.connections - i)
        opening = (open_idle(host, port, "/health") for _ in range(batch))
        results = await asyncio.gather(*opening, return_exceptions=True)
        for r in results:
            if isinstance(r, asyncio.StreamWriter):
                held.append(r)
            else:
                errors[type(r).__name__] = errors.get(type(r).__name__, 0) + 1
    opened_s = time.perf_counter() - started
    during = await settle(session, args.metrics)
    for writer in held:
        writer.close()
    await asyncio.sleep(1)
    after = await settle(session, args.metrics)
    return {
        "connections": args.connections,
        "held": len(held),
        "errors": errors,
        "open_s": round(opened_s, 2),
        "rss_before_mib": round(before["rss_bytes"] / MiB, 1),
        "rss_held_mib": round(during["rss_bytes"] / MiB, 1),
        "rss_after_close_mib": round(after["rss_bytes"] / MiB, 1),
        "gateway_open_fds_held": int(during["open_fds"]),
        "kib_per_connection": round((during["rss_bytes"] - before["rss_bytes"]) / max(len(held), 1) / 1024, 2),
    }


async def waiters(session: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    async with session.post(
        args.admin + "/unload", json={"model": args.waiters_model}, headers=args.admin_headers
    ) as resp:
        if resp.status not in (200, 404):
            sys.exit(f"gateway_memory: unloading {args.waiters_model}: HTTP {resp.status}")
    before = await settle(session, args.metrics)
    headers = {"X-SSW-Wait": "true", **({"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})}
    body = {"model": args.waiters_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def one() -> int:
        async with session.post(args.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(one()) for _ in range(args.waiters)]
    waiting = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(t.done() for t in tasks):
        async with session.get(args.url + "/health") as resp:
            waiting = sum((await resp.json())["waiting"].values())
        if waiting >= args.waiters:
            break
        await asyncio.sleep(0.2)
    during = await footprint(session, args.metrics)
    statuses = await asyncio.gather(*tasks, return_exceptions=True)
    by_status: dict[str, int] = {}
    for s in statuses:
        key = str(s) if isinstance(s, int) else type(s).__name__
        by_status[key] = by_status.get(key, 0) + 1
    return {
        "waiters": args.waiters,
        "seen_waiting": waiting,
        "rss_before_mib": round(before["rss_bytes"] / MiB, 1),
        "rss_waiting_mib": round(during["rss_bytes"] / MiB, 1),
        "kib_per_waiter": round((during["rss_bytes"] - before["rss_bytes"]) / max(waiting, 1) / 1024, 2),
        "answers": by_status,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=args.timeout)) as s:
        if args.waiters:
            w = report["waiters"] = await waiters(s, args)
            print(
                f"waiting requests: {w['seen_waiting']} of {w['waiters']} waiting; gateway RSS {w['rss_before_mib']} "
                f"-> {w['rss_waiting_mib']} MiB ({w['kib_per_waiter']} KiB each); answers {w['answers']}"
            )
        if args.connections:
            c = report["connections"] = await connections(s, args)
            print(
                f"idle connections: {c['held']} of {c['connections']} held (opened in {c['open_s']} s); gateway RSS "
                f"{c['rss_before_mib']} -> {c['rss_held_mib']} MiB ({c['kib_per_connection']} KiB each), "
                f"{c['rss_after_close_mib']} MiB after closing; errors {c['errors'] or 'none'}"
            )
    return report


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    p.add_argument("--metrics", default="http://127.0.0.1:8002/metrics", help="the gateway's Prometheus endpoint")
    p.add_argument("--api-key", default="")
    admin_api.add_arguments(p, "to unload")
    p.add_argument("--connections", type=int, default=10000, help="idle keep-alive connections (0: skip)")
    p.add_argument("--batch", type=int, default=500, help="connections opened at once")
    p.add_argument("--waiters", type=int, default=1000, help="requests waiting for one load (0: skip)")
    p.add_argument("--waiters-model", default="tiny-b", help="an unpinned model (it is unloaded first)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    options.admin_headers = admin_api.headers(options)
    # One descriptor per connection, on this side too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = options.connections + options.waiters + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    result = asyncio.run(main(options))
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2) + "\n")
