"""The asynchronous tier under load: what a running batch costs interactive
traffic on the same model, and how fast the batch goes.

    python bench/batch.py --url http://127.0.0.1:8000 --api-key-file .cache/demo-key \\
        --model bench-fake-busy --lines 1000 --json bench/results/batch.json

Three phases on one model, one after the other, with the same open-loop
interactive load (``--rps`` chat requests a second, each ``--interactive-tokens``
long, for ``--seconds``):

1. **alone**: the interactive load and nothing else;
2. **ssw batch**: the same while a batch of ``--lines`` lines runs on the model
   (OpenAI Batch API, submitted through the official SDK's routes);
3. **naive**: the same while the same lines are sent as ordinary requests by a
   client at ``--naive-concurrency`` (what a studio does without a batch tier,
   or with a peer that forwards batches to providers only).

Reported per phase: the interactive requests' p50/p99/max latency, and for the
background work its lines per second. On the demo, ``bench-fake-busy`` is the
fake engine at 100 tokens/s per stream with 8 sequences at once and vLLM's
priority scheduling: a GPU with finite room, where background work can take
it from the game.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

CHAT = [{"role": "user", "content": "Say something."}]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key-file", type=Path)
    p.add_argument("--model", default="bench-fake-busy")
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--line-tokens", type=int, default=32, help="max_tokens of each batch line")
    p.add_argument("--rps", type=float, default=4.0, help="interactive requests per second")
    p.add_argument("--interactive-tokens", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0, help="how long the interactive load runs per phase")
    p.add_argument("--naive-concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800.0, help="longest wait for the batch")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


class Bench:
    def __init__(self, session: aiohttp.ClientSession, args: argparse.Namespace) -> None:
        self.session = session
        self.args = args
        self.url = args.url.rstrip("/")
        key = args.api_key_file.read_text().strip() if args.api_key_file else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def chat(self, max_tokens: int, priority: str = "interactive") -> float:
        body = {"model": self.args.model, "messages": CHAT, "max_tokens": max_tokens}
        headers = {**self.headers, "X-SSW-Priority": priority}
        t0 = time.perf_counter()
        async with self.session.post(self.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"chat answered {resp.status}")
        return time.perf_counter() - t0

    async def interactive(self, seconds: float) -> list[float]:
        """Open loop: a request every 1/rps s, however long the answers take."""
        tasks = []
        interval = 1.0 / self.args.rps
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds:
            tasks.append(asyncio.create_task(self.chat(self.args.interactive_tokens)))
            n += 1
            await asyncio.sleep(max(start + n * interval - time.perf_counter(), 0))
        return list(await asyncio.gather(*tasks))

    def lines(self) -> bytes:
        out = []
        for i in range(self.args.lines):
            body = {"model": self.args.model, "messages": CHAT, "max_tokens": self.args.line_tokens}
            out.append(
                json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
            )
        return ("\n".join(out) + "\n").encode()

    async def submit_batch(self) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", io.BytesIO(self.lines()), filename="bench.jsonl")
        async with self.session.post(self.url + "/v1/files", data=form, headers=self.headers) as resp:
            uploaded = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"upload: {uploaded}")
        spec = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        async with self.session.post(self.url + "/v1/batches", json=spec, headers=self.headers) as resp:
            batch = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"create: {batch}")
        return str(batch["id"])

    async def batch(self, batch_id: str) -> dict[str, Any]:
        async with self.session.get(self.url + f"/v1/batches/{batch_id}", headers=self.headers) as resp:
            got: dict[str, Any] = await resp.json()
            return got

    async def wait_batch(self, batch_id: str) -> tuple[dict[str, Any], float]:
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            got = await self.batch(batch_id)
            if got["status"] in ("completed", "failed", "expired", "cancelled"):
                return got, time.monotonic()
            await asyncio.sleep(0.5)
        raise TimeoutError(f"batch {batch_id} did not end within {self.args.timeout:.0f} s")

    async def naive(self) -> tuple[int, float]:
        """The same lines as ordinary requests, ``--naive-concurrency`` at a time."""
        sem = asyncio.Semaphore(self.args.naive_concurrency)
        t0 = time.monotonic()

        async def one() -> None:
            async with sem:
                await self.chat(self.args.line_tokens)

        await asyncio.gather(*(one() for _ in range(self.args.lines)))
        return self.args.lines, time.monotonic() - t0


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {
        "requests": len(ordered),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "max_ms": round(ordered[-1] * 1000, 1),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        bench = Bench(session, args)
        await bench.chat(1)  # the model ready (held while it loads)
        phases: dict[str, Any] = {}

        print(f"alone: {args.rps:g} interactive requests/s for {args.seconds:g} s", file=sys.stderr)
        phases["alone"] = {"interactive": summary(await bench.interactive(args.seconds))}

        print(f"ssw batch: {args.lines} lines, and the same interactive load", file=sys.stderr)
        t0 = time.monotonic()
        batch_id = await bench.submit_batch()
        latencies = await bench.interactive(args.seconds)
        final, ended = await bench.wait_batch(batch_id)
        running_s = ended - t0
        if running_s < args.seconds:
            print("  (the batch ended before the interactive load did: use more --lines)", file=sys.stderr)
        counts = final["request_counts"]
        phases["ssw_batch"] = {
            "interactive": summary(latencies),
            "background": {
                "status": final["status"],
                "lines": counts["total"],
                "completed": counts["completed"],
                "failed": counts["failed"],
                "seconds": round(running_s, 1),
                "lines_per_s": round(counts["completed"] / running_s, 2),
            },
        }

        print(f"naive: the same lines as ordinary requests, {args.naive_concurrency} at a time", file=sys.stderr)
        naive = asyncio.create_task(bench.naive())
        latencies = await bench.interactive(args.seconds)
        done, seconds = await naive
        phases["naive"] = {
            "interactive": summary(latencies),
            "background": {"lines": done, "seconds": round(seconds, 1), "lines_per_s": round(done / seconds, 2)},
        }
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("api_key_file", "json")},
        "phases": phases,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = asyncio.run(run(args))
    print(f"{'phase':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'n':>5}   background")
    for name, phase in out["phases"].items():
        i = phase["interactive"]
        bg = phase.get("background")
        extra = f"{bg['lines_per_s']} lines/s ({bg['lines']} in {bg['seconds']} s)" if bg else "-"
        print(f"{name:<10} {i['p50_ms']:>8} {i['p99_ms']:>8} {i['max_ms']:>8} {i['requests']:>5}   {extra}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
