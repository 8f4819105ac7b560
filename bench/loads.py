"""Loads and swaps, timed phase by phase (the SSW load-timing benchmark).

    python bench/loads.py --api-key KEY --admin-token-file /var/lib/ssw/admin.token \\
        --cold tiny-a --swap tiny-b --waiters 500 --json out.json

1. cold: the model is unloaded, then one streamed request for it (X-SSW-Wait)
   is timed from sending to its first token. The loader's marks split that
   time into: request to loader, placement, unit start, process up (vLLM has
   bound its port), engine ready (/health answers), first token.
2. swap: the same for a model that fits only after an eviction; the eviction
   (stopping the least recently used worker) is part of its placement phase.
   The cold model must be loaded and the swap model must not fit beside it.
3. swap back (--swap-back): a request for the cold model again, which the
   swap evicted: with sleep mode it sleeps, and this times its wake (the swap
   model giving way, the wake, the 1-token canary); without, a cold start.
4. --cold-cache clear: the cold model's compile caches (/var/cache/ssw/<model>)
   are removed first, so the cold load is a first start on this host; run it
   once with clear and once with keep to see what the caches save.
5. waiters: the model is unloaded and N clients ask for it at once (one token
   each); reported is the time from the worker being healthy to the last
   client's answer.

vLLM's own time is its process's: from the unit's start to /health answering.
ssw's added time is everything else from the request to the first token, less
what the same request takes straight to the now warm worker (its TTFT) and
less the evicted worker's shutdown (vLLM's, and unavoidable: its memory must
be free before the next worker starts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import admin_api
import aiohttp
import targets

from ssw.loader.systemd.engine import cache_directory

WAIT = {"X-SSW-Wait": "true"}


class Stack:
    def __init__(self, session: aiohttp.ClientSession, args: argparse.Namespace) -> None:
        self.session = session
        self.url = args.url.rstrip("/")
        self.admin = args.admin.rstrip("/")
        self.max_tokens = args.max_tokens
        self.public_headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.admin_headers: dict[str, str] = args.admin_headers
        self.worker_root: str = args.worker_root

    async def admin_call(
        self, method: str, path: str, body: dict[str, Any] | None = None, ok: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        async with self.session.request(method, self.admin + path, json=body, headers=self.admin_headers) as resp:
            data: dict[str, Any] = await resp.json(content_type=None)
            if resp.status >= 400 and resp.status not in ok:
                sys.exit(f"loads: {method} {path}: {resp.status} {data}")
            return data

    async def workers(self, model: str) -> list[dict[str, Any]]:
        status = await self.admin_call("GET", "/status")
        return [w for w in status["workers"] if w["model"] == model]

    async def unload(self, model: str) -> None:
        # Returns once the units have stopped; 404: it was not loaded.
        await self.admin_call("POST", "/unload", {"model": model}, ok=(404,))

    def body(self, model: str, stream: bool, max_tokens: int | None = None) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens or self.max_tokens,
            # vLLM's: a random tiny model may end at once, or with tokens of no text.
            "ignore_eos": True,
            "stream": stream,
        }

    async def first_token(self, target: str, model: str, headers: dict[str, str]) -> tuple[float, float]:
        """(sent, first token) of one streamed request to a URL or a worker's socket, as time.time()."""
        client, base = targets.session(target)
        sent = time.time()
        async with (
            client,
            client.post(base + "/v1/chat/completions", json=self.body(model, True), headers=headers) as resp,
        ):
            if resp.status != 200:
                sys.exit(f"loads: {model}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
            first = None
            async for line in resp.content:
                if first is None and line.startswith(b"data: {"):
                    choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                    delta = choice.get("delta") or {}
                    # Not the role chunk vLLM sends before generating: a token, or the end.
                    if delta.get("content") or ("role" not in delta and choice.get("finish_reason")):
                        first = time.time()
            if first is None:
                sys.exit(f"loads: {model}: the stream had no token")
            return sent, first

    async def answer(self, model: str) -> float:
        # One token: the time to the last answer is then the release, not generation.
        body = self.body(model, False, max_tokens=1)
        async with self.session.post(
            self.url + "/v1/chat/completions", json=body, headers={**self.public_headers, **WAIT}
        ) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            return time.time()


def breakdown(sent: float, first: float, worker: dict[str, Any], direct_ttft: float) -> dict[str, Any]:
    marks, phases = worker["load_marks"], worker["load_phases_s"]
    vllm_own = marks["healthy"] - marks["unit_started"]
    # Stopping the evicted worker: its vLLM's shutdown, which a swap cannot skip
    # (the memory must be free before the next one starts).
    eviction = phases.get("eviction", 0.0)
    total = first - sent
    return {
        "model": worker["model"],
        "unit": worker["unit"],
        "to_first_token_s": round(total, 3),
        "phases_s": {
            "request_to_loader": round(marks["requested"] - sent, 3),
            **{k: v for k, v in phases.items() if k != "total"},
            "first_token": round(first - marks["healthy"], 3),
        },
        "vllm_own_s": round(vllm_own, 3),
        "eviction_s": round(eviction, 3),
        "direct_ttft_s": round(direct_ttft, 4),
        "ssw_added_s": round(total - vllm_own - eviction - direct_ttft, 3),
    }


async def timed_load(stack: Stack, model: str) -> dict[str, Any]:
    sent, first = await stack.first_token(stack.url, model, {**stack.public_headers, **WAIT})
    worker = next(w for w in await stack.workers(model) if w["state"] == "ready" and w["load_marks"])
    ttfts = []
    for _ in range(3):
        s, f = await stack.first_token(targets.worker_target(worker, stack.worker_root), model, {})
        ttfts.append(f - s)
    return breakdown(sent, first, worker, statistics.median(ttfts))


async def waiters(stack: Stack, model: str, n: int) -> dict[str, Any]:
    await stack.unload(model)
    started = time.time()
    results = await asyncio.gather(*(stack.answer(model) for _ in range(n)), return_exceptions=True)
    done = sorted(r for r in results if isinstance(r, float))
    errors = [str(r) for r in results if not isinstance(r, float)]
    worker = next(w for w in await stack.workers(model) if w["load_marks"].get("healthy"))
    healthy = worker["load_marks"]["healthy"]
    return {
        "model": model,
        "clients": n,
        "served": len(done),
        "errors": sorted(set(errors)),
        "load_s": round(healthy - started, 3),
        "healthy_to_first_answer_s": round(done[0] - healthy, 3) if done else None,
        "healthy_to_median_answer_s": round(statistics.median(done) - healthy, 3) if done else None,
        "healthy_to_last_answer_s": round(done[-1] - healthy, 3) if done else None,
    }


async def swap_back(stack: Stack, model: str) -> dict[str, Any]:
    """A request for a model that gave way to the swap: woken if it sleeps, else loaded cold."""
    slept = [w for w in await stack.workers(model) if w["state"] == "sleeping"]
    if not slept:
        result = await timed_load(stack, model)
        result["tier"] = "stopped"
        return result
    sent, first = await stack.first_token(stack.url, model, {**stack.public_headers, **WAIT})
    worker = next(w for w in await stack.workers(model) if w["unit"] == slept[0]["unit"])
    marks = worker["load_marks"]
    return {
        "model": model,
        "unit": worker["unit"],
        "tier": f"sleeping (level {slept[0]['sleep_level']})",
        "to_first_token_s": round(first - sent, 3),
        "phases_s": {
            "request_to_loader": round(marks["requested"] - sent, 3),
            "placement": round(marks["placed"] - marks["requested"], 3),
            # The swap model draining, going to sleep and its memory seen free.
            "eviction": round(marks["evicted"] - marks["placed"], 3),
            "wake_and_canary": round(marks["healthy"] - marks["evicted"], 3),
            "first_token": round(first - marks["healthy"], 3),
        },
    }


def show(title: str, r: dict[str, Any]) -> None:
    print(f"{title}: {r['model']} ({r['unit']}): first token after {r['to_first_token_s']:.2f} s")
    for phase, s in r["phases_s"].items():
        print(f"  {phase:<18} {s:8.3f} s")
    print(
        f"  vLLM's own start {r['vllm_own_s']:.2f} s, its TTFT when warm {r['direct_ttft_s'] * 1000:.1f} ms"
        + (f", the evicted worker's shutdown {r['eviction_s']:.2f} s" if r["eviction_s"] >= 0.01 else "")
        + f"; ssw added {r['ssw_added_s']:.3f} s"
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    report: dict[str, Any] = {"machine": machine()}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stack = Stack(session, args)
        if args.cold:
            # From nothing: neither model loaded, so the cold load evicts nobody.
            for model in (args.cold, args.swap):
                if model:
                    await stack.unload(model)
            if args.cold_cache == "clear":
                cache = Path(args.worker_root) / "var/cache" / cache_directory(args.cold).lstrip("/")
                shutil.rmtree(cache, ignore_errors=True)
                print(f"cold load with no compile cache ({cache} removed)")
            report["cold"] = await timed_load(stack, args.cold)
            show("cold load", report["cold"])
        if args.swap:
            if not args.cold:
                sys.exit("loads: --swap needs --cold (the model it evicts)")
            before = (await stack.admin_call("GET", "/status"))["evictions_total"]
            await stack.unload(args.swap)
            report["swap"] = await timed_load(stack, args.swap)
            evicted = (await stack.admin_call("GET", "/status"))["evictions_total"] - before
            report["swap"]["evictions"] = evicted
            show(f"swap ({evicted} eviction{'s' if evicted != 1 else ''})", report["swap"])
            if not evicted:
                print("  note: nothing was evicted; the swap model fit beside the cold one")
        if args.swap_back:
            back = report["swap_back"] = await swap_back(stack, args.cold)
            print(f"swap back: {back['model']} ({back['tier']}): first token after {back['to_first_token_s']:.2f} s")
            for phase, s in back["phases_s"].items():
                print(f"  {phase:<18} {s:8.3f} s")
        if args.waiters:
            model = args.waiters_model or args.cold or args.swap
            if not model:
                sys.exit("loads: --waiters needs --waiters-model (or --cold)")
            w = report["waiters"] = await waiters(stack, model, args.waiters)
            print(
                f"waiters: {w['served']} of {w['clients']} clients served by one load of {model} "
                f"({w['load_s']:.1f} s); after healthy: first {w['healthy_to_first_answer_s']} s, "
                f"median {w['healthy_to_median_answer_s']} s, last {w['healthy_to_last_answer_s']} s"
            )
            if w["errors"]:
                print(f"  errors: {w['errors']}")
    return report


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    p.add_argument("--api-key", default="", help="a key for the gateway (none: auth is off)")
    admin_api.add_arguments(p, "to load, unload and read the marks")
    targets.add_arguments(p)
    p.add_argument("--cold", help="model to load from nothing")
    p.add_argument("--swap", help="model that fits only by evicting --cold")
    p.add_argument("--swap-back", action="store_true", help="then ask for --cold again (woken if it sleeps)")
    p.add_argument("--cold-cache", choices=("keep", "clear"), default="keep", help="clear: remove its compile caches")
    p.add_argument("--waiters", type=int, default=0, help="clients waiting on one load")
    p.add_argument("--waiters-model", help="model the waiters ask for (default: --cold)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=900, help="seconds any one request may take")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    options.admin_headers = admin_api.headers(options)
    result = asyncio.run(main(options))
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2) + "\n")
