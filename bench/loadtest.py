"""Load generator for any OpenAI-compatible endpoint (the SSW load-test tool).

    python bench/loadtest.py --url http://127.0.0.1:8000 --model light --concurrency 1,8,64 \\
        --requests 200 --stream --max-tokens 64 --json out.json [--plot out.png]

    # Overhead: the same load alternately straight to a worker (A) and through
    # the gateway (B), A B A B ..., reported as ratios.
    python bench/loadtest.py --ab http://127.0.0.1:8100 http://127.0.0.1:8000 --model tiny ...

Reports requests/s, output tokens/s, time to first token, inter-token latency
and end-to-end latency (p50/p95/p99), and errors by kind. Every process shares
this machine's cores, so the gateway's own CPU use shows up in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import admin_api
import aiohttp
import targets

PERCENTILES = (0.5, 0.95, 0.99)


@dataclass
class Sample:
    ok: bool
    error: str
    e2e_s: float
    ttft_s: float | None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


async def one_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> Sample:
    started = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                return Sample(False, f"http_{resp.status}", time.perf_counter() - started, None)
            if not body.get("stream"):
                data = await resp.json()
                tokens = (data.get("usage") or {}).get("completion_tokens") or 0
                e2e = time.perf_counter() - started
                return Sample(True, "", e2e, e2e, [], tokens)
            ttft = None
            last = None
            itl: list[float] = []
            tokens = 0
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage") and not chunk.get("choices"):
                    tokens = chunk["usage"].get("completion_tokens") or tokens
                    continue
                now = time.perf_counter()
                choice = (chunk.get("choices") or [{}])[0]
                if (choice.get("delta") or {}).get("content") or choice.get("text"):
                    if ttft is None:
                        ttft = now - started
                    elif last is not None:
                        itl.append(now - last)
                    last = now
            return Sample(True, "", time.perf_counter() - started, ttft, itl, tokens)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Sample(False, type(exc).__name__, time.perf_counter() - started, None)


def request_body(args: argparse.Namespace, model: str) -> tuple[str, dict[str, Any]]:
    prompt = ("The quick brown fox jumps over the lazy dog. " * (args.prompt_words // 9 + 1))[: args.prompt_words * 5]
    body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "temperature": 0}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if args.endpoint == "completions":
        body["prompt"] = prompt
        return "/v1/completions", body
    body["messages"] = [{"role": "user", "content": prompt}]
    return "/v1/chat/completions", body


async def run_load(args: argparse.Namespace, base: str, concurrency: int, label: str) -> dict[str, Any]:
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    headers.update({k: v for k, v in (h.split(":", 1) for h in args.header)})
    total = args.requests
    deadline = time.monotonic() + args.duration if args.duration else None
    samples: list[Sample] = []
    issued = 0
    rng = random.Random(0)

    client, base = targets.session(base, args.timeout)
    async with client as session:

        async def worker() -> None:
            nonlocal issued
            while True:
                if deadline is not None:
                    if time.monotonic() >= deadline:
                        return
                elif issued >= total:
                    return
                issued += 1
                path, body = request_body(args, rng.choice(models))
                samples.append(await one_request(session, base.rstrip("/") + path, body, headers))
                if not args.quiet and sys.stderr.isatty():
                    goal = f"{total}" if deadline is None else f"{args.duration:.0f} s"
                    print(f"\r{label} c={concurrency}: {len(samples)} done ({goal})", end="", file=sys.stderr)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    if not args.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    return summarize(samples, wall, concurrency, label)


def summarize(samples: list[Sample], wall: float, concurrency: int, label: str) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error] = errors.get(s.error, 0) + 1
    e2e = [s.e2e_s for s in ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    itl = [x for s in ok for x in s.itl_s]
    tokens = sum(s.output_tokens for s in ok)
    return {
        "label": label,
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 2) if wall else 0.0,
        "output_tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        "e2e_ms": {f"p{int(p * 100)}": ms(pct(e2e, p)) for p in PERCENTILES},
        "ttft_ms": {f"p{int(p * 100)}": ms(pct(ttft, p)) for p in PERCENTILES},
        "itl_ms": {f"p{int(p * 100)}": ms(pct(itl, p)) for p in PERCENTILES},
    }


def show(result: dict[str, Any]) -> None:
    e, t, i = result["e2e_ms"], result["ttft_ms"], result["itl_ms"]
    print(
        f"{result['label']:>8} c={result['concurrency']:<4} {result['ok']}/{result['requests']} ok  "
        f"{result['requests_per_s']:8.1f} req/s {result['output_tokens_per_s']:9.1f} tok/s  "
        f"e2e p50/p95/p99 {e['p50']}/{e['p95']}/{e['p99']} ms  ttft p50 {t['p50']} ms  itl p50 {i['p50']} ms"
        + (f"  errors {result['errors']}" if result["errors"] else "")
    )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(c) for c in str(args.concurrency).split(",")]
    # The results are meant to be kept and shared: no key or header value in them.
    shown = {
        **{k: v for k, v in vars(args).items() if k != "admin_headers"},
        "api_key": "<redacted>" if args.api_key else "",
        "header": [h.split(":", 1)[0] for h in args.header],
    }
    out: dict[str, Any] = {"args": shown, "machine": {"cpus": os.cpu_count()}, "runs": []}
    if args.ab:
        direct, gateway = args.ab
        if direct == "worker":
            direct = await worker_url(args)
            print(f"A: {args.model}'s worker at {direct}")
        print(
            "A = straight to the worker, B = through the gateway; all processes share "
            f"this machine's {os.cpu_count()} cores, so the gateway's CPU use shows in B."
        )
        if args.warmup:
            # Not counted: first requests pay for connection set-up and, on vLLM,
            # for compiling each new batch shape, which would land in one side only.
            for label, url in (("A", direct), ("B", gateway)):
                saved, args.requests = args.requests, args.warmup
                await run_load(args, url, max(levels), f"warm-up {label}")
                args.requests = saved
        for c in levels:
            rounds: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
            for _ in range(args.rounds):
                for label, url in (("A", direct), ("B", gateway)):
                    r = await run_load(args, url, c, label)
                    show(r)
                    rounds[label].append(r)
            ratio = _ab_ratio(rounds["A"], rounds["B"])
            print(
                f"   c={c}: throughput B/A {ratio['throughput_ratio']:.3f}, added e2e p50 "
                f"{ratio['added_p50_ms']:+.2f} ms, p99 {ratio['added_p99_ms']:+.2f} ms"
            )
            out["runs"].append({"concurrency": c, "rounds": rounds, **ratio})
    else:
        for c in levels:
            r = await run_load(args, args.url, c, "run")
            show(r)
            out["runs"].append(r)
    return out


async def worker_url(args: argparse.Namespace) -> str:
    """The model's worker, loaded if it is not, from the loader's admin API."""
    load = {"model": args.model, "wait": True}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as session,
        session.post(args.admin + "/load", json=load, headers=args.admin_headers) as resp,
    ):
        body = await resp.json(content_type=None)
        if resp.status != 200:
            sys.exit(f"loadtest: loading {args.model} through {args.admin}: HTTP {resp.status}: {body}")
    return targets.worker_target(body["workers"][0], args.worker_root)


def _ab_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, float]:
    def med(rs: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
        values = [r[key][sub] if sub else r[key] for r in rs]
        return float(statistics.median(v for v in values if v is not None))

    return {
        "throughput_ratio": round(med(b, "output_tokens_per_s") / max(med(a, "output_tokens_per_s"), 1e-9), 4)
        if med(a, "output_tokens_per_s") > 0
        else round(med(b, "requests_per_s") / max(med(a, "requests_per_s"), 1e-9), 4),
        "added_p50_ms": round(med(b, "e2e_ms", "p50") - med(a, "e2e_ms", "p50"), 3),
        "added_p99_ms": round(med(b, "e2e_ms", "p99") - med(a, "e2e_ms", "p99"), 3),
    }


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"] if not result["args"]["ab"] else [r["rounds"]["B"][0] for r in result["runs"]]
    xs = [r["concurrency"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r["output_tokens_per_s"] for r in runs], marker="o")
    left.set_xlabel("concurrency")
    left.set_ylabel("output tokens/s")
    for p in ("p50", "p99"):
        right.plot(xs, [r["e2e_ms"][p] for r in runs], marker="o", label=f"e2e {p}")
    right.set_xlabel("concurrency")
    right.set_ylabel("ms")
    right.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of an OpenAI-compatible server")
    target.add_argument(
        "--ab",
        nargs=2,
        metavar=("DIRECT", "GATEWAY"),
        help="alternate two base URLs; DIRECT 'worker': the model's worker, found (and loaded) through --admin",
    )
    admin_api.add_arguments(p, "for --ab worker")
    targets.add_arguments(p)
    p.add_argument("--model", required=True, help="model or alias; a comma list is a mix")
    p.add_argument("--concurrency", default="8", help="one level, or a comma list for a sweep")
    p.add_argument("--requests", type=int, default=100, help="requests per level (and per A/B round)")
    p.add_argument("--duration", type=float, help="seconds per level instead of a request count")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds per level")
    p.add_argument("--warmup", type=int, default=0, help="A/B: requests sent to each side first, not counted")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ignore-eos", action="store_true", help="vLLM: always generate max_tokens")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--header", action="append", default=[], help="NAME:VALUE, repeatable")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG of throughput and latency against concurrency")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.admin_headers = admin_api.headers(args) if args.ab and args.ab[0] == "worker" else {}
    result = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=lambda o: asdict(o))
    if args.plot:
        plot(result, args.plot)
    failed = any(r.get("errors") for r in result["runs"] if "errors" in r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
