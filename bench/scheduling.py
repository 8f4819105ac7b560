"""Scheduling that knows what a swap costs: three measurements, side by side in one run.

    python bench/scheduling.py --json bench/results/scheduling.json     # as root, about 5 minutes

It boots its own disposable systemd host (tests/harness: systemd in a PID and
mount namespace) and brings up ssw twice in it, one stack after the other, with
the fake engine paced like a GPU (``--tps`` tokens per second per stream, a cold
start of ``--load-delay`` s, a running batch of ``--max-seqs``):

- **today**: ``placement.min_residency_s`` 0, ``placement.drain_queue_before_swap``
  0, no ``gateway.non_realtime_cap_per_worker`` (the behaviour before issue 29);
- **policy**: min residency ``--residency`` s, a victim serves up to ``--drain``
  more requests before a swap, and interactive/batch work is capped at
  ``--cap`` per worker while realtime traffic is about.

and measures, on each:

1. **thrash**: two models that cannot share GPU 0, asked for by two groups of
   ``--clients`` clients each (closed loop: a client sends its next request when
   the last one is answered; an error costs it 0.2 s) for ``--seconds`` s.
   Completed and failed requests, swaps (evictions of one for the other), and
   p50/p95 latency of the completed ones.
2. **isolation**: one worker (GPU 1) that runs ``--max-seqs`` requests at once,
   with priority scheduling; a realtime client streams short answers one after
   another and its time to first token is measured, alone, beside an
   interactive flood, and beside a batch (``--max-seqs`` × 2 clients of long
   answers each).

and, on the policy stack:

3. **deadline**: a realtime request for a model that is not loaded (its
   fallback is ready), with ``X-SSW-Deadline-Ms: 500`` and without, in
   alternating rounds (the model is unloaded before each): time to the answer,
   and who served it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, percentile, wait_for
from tests.harness.sysbox import SysBox

CHAT = [{"role": "user", "content": "hi"}]
SWAP_MARK = "evicted to make room for"


def models(args: argparse.Namespace) -> dict[str, Any]:
    paced = {"SSW_FAKE_TPS": str(args.tps), "SSW_FAKE_LOAD_DELAY": str(args.load_delay)}
    return {
        # Two models that cannot share GPU 0 (10 GB).
        "swap-a": {"path": "m", "vram_gb": 6, "gpus": [0], "env": paced},
        "swap-b": {"path": "m", "vram_gb": 6, "gpus": [0], "env": paced},
        # One worker with a finite running batch and priority scheduling, as vLLM's.
        "npc": {
            "path": "m",
            "vram_gb": 2,
            "gpus": [1],
            "scheduling_policy": "priority",
            "env": {"SSW_FAKE_TPS": str(args.tps), "SSW_FAKE_MAX_SEQS": str(args.max_seqs)},
        },
        # A cold model and the ready fallback a deadline falls back to.
        "cold": {"path": "m", "vram_gb": 2, "gpus": [1], "fallbacks": ["warm"], "env": paced},
        "warm": {"path": "m", "vram_gb": 2, "gpus": [1], "env": {"SSW_FAKE_TPS": str(args.tps)}},
    }


def settings(args: argparse.Namespace, policy: bool) -> dict[str, Any]:
    return {
        "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}, {"memory_gb": 10}]},
        "placement": {
            "runtime_overhead_gb": 0,
            "min_residency_s": args.residency if policy else 0,
            "drain_queue_before_swap": args.drain if policy else 0,
        },
        "gateway": {"non_realtime_cap_per_worker": args.cap if policy else None, "realtime_window_s": 60},
    }


def chat(stack: Stack, model: str, tokens: int, priority: str, headers: dict[str, str] | None = None) -> int:
    body = {"model": model, "messages": CHAT, "max_tokens": tokens}
    status, _, _ = http(
        "POST",
        stack.public + "/v1/chat/completions",
        body,
        {"X-SSW-Priority": priority, **(headers or {})},
        timeout=300,
    )
    return status


def ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.50) * 1000, 1),
        "p95_ms": round(percentile(values, 0.95) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def closed_loop(seconds: float, clients: int, call: Callable[[], int]) -> tuple[list[float], int]:
    """Clients that each send a request when the last is answered, for ``seconds``:
    (latencies of the answered ones, requests that failed)."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            status = call()
            with lock:
                if status == 200:
                    latencies.append(time.monotonic() - started)
                else:
                    failed[0] += 1
            if status != 200:
                time.sleep(0.2)

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return latencies, failed[0]


def thrash(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    stack.load("swap-a")
    swaps_before = stack.loader.log().count(SWAP_MARK)
    results: dict[str, tuple[list[float], int]] = {}

    def group(model: str) -> None:
        results[model] = closed_loop(args.seconds, args.clients, lambda: chat(stack, model, args.tokens, "interactive"))

    threads = [threading.Thread(target=group, args=(m,)) for m in ("swap-a", "swap-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = results["swap-a"][0] + results["swap-b"][0]
    out = {
        "completed": len(latencies),
        "failed": results["swap-a"][1] + results["swap-b"][1],
        "per_model": {m: len(r[0]) for m, r in results.items()},
        "swaps": stack.loader.log().count(SWAP_MARK) - swaps_before,
        **ms(latencies),
    }
    for m in ("swap-a", "swap-b"):
        stack.unload(m)
    return out


def ttft(stack: Stack, model: str, priority: str) -> float | None:
    """Seconds from sending a streamed request to its first token, or None on an error."""
    host, port = stack.public.removeprefix("http://").rsplit(":", 1)
    conn = HTTPConnection(host, int(port), timeout=300)
    body = json.dumps({"model": model, "messages": CHAT, "max_tokens": 4, "stream": True})
    started = time.monotonic()
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json", "X-SSW-Priority": priority},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        first = None
        for line in resp:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.monotonic() - started
        return first
    finally:
        conn.close()


def flood(stack: Stack, tokens: int, priority: str, stop: threading.Event, done: list[int]) -> None:
    """Long requests, one after another, until told to stop."""
    while not stop.is_set():
        done.append(chat(stack, "npc", tokens, priority))


def isolation(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    stack.load("npc")
    out: dict[str, Any] = {}
    for phase, background in (("alone", None), ("beside_interactive", "interactive"), ("beside_batch", "batch")):
        stop = threading.Event()
        done: list[int] = []
        pool = ThreadPoolExecutor(args.max_seqs * 2)
        if background is not None:
            for _ in range(args.max_seqs * 2):
                pool.submit(flood, stack, args.long_tokens, background, stop, done)
            time.sleep(2.0)  # the flood fills the running batch first
        samples: list[float] = []
        end = time.monotonic() + args.isolation_seconds
        while time.monotonic() < end:
            t = ttft(stack, "npc", "realtime")
            if t is not None:
                samples.append(t)
            time.sleep(0.1)
        stop.set()
        pool.shutdown(wait=True)
        out[phase] = {**ms(samples), "background_completed": done.count(200)}
    stack.unload("npc")
    return out


def deadline(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    stack.load("warm")
    times: dict[str, list[float]] = {"with_deadline": [], "without": []}
    served_by_fallback = 0
    for _ in range(args.deadline_rounds):
        for kind in ("with_deadline", "without"):
            stack.unload("cold")
            headers = {"X-SSW-Deadline-Ms": "500"} if kind == "with_deadline" else {}
            started = time.monotonic()
            status, hdrs, _ = http(
                "POST",
                stack.public + "/v1/chat/completions",
                {"model": "cold", "messages": CHAT, "max_tokens": 1},
                {"X-SSW-Priority": "realtime", **headers},
                timeout=300,
            )
            took = time.monotonic() - started
            if status == 200:
                times[kind].append(took)
                served_by_fallback += kind == "with_deadline" and hdrs.get("x-ssw-fallback-from") == "cold"
            wait_for(lambda: "cold" in ready(stack), 120, "cold's load to finish")
    stack.unload("cold")
    stack.unload("warm")
    return {k: ms(v) for k, v in times.items()} | {"served_by_fallback": served_by_fallback}


def ready(stack: Stack) -> set[str]:
    return {w["model"] for w in stack.status()["workers"] if w["state"] == "ready"}


def run_stack(box: SysBox, args: argparse.Namespace, name: str, models_dir: Path) -> dict[str, Any]:
    directory = WORK_ROOT / f"sched-{name}-{os.getpid()}"
    stack = start_stack(box, directory, models_dir, models(args), "fake", settings(args, name == "policy"))
    try:
        out: dict[str, Any] = {"thrash": thrash(stack, args), "isolation": isolation(stack, args)}
        if name == "policy":
            out["deadline"] = deadline(stack, args)
        return out
    finally:
        for w in stack.status()["workers"]:
            http("POST", stack.admin + "/unload", {"model": w["model"]}, timeout=120)
        stop_stack(stack)


def report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    today, policy = figures["today"], figures["policy"]
    print(f"thrash: two models on one GPU, {args.clients} clients each, {args.seconds:.0f} s")
    for name, f in (("today", today["thrash"]), ("policy", policy["thrash"])):
        print(
            f"  {name:7s} completed {f['completed']:5d}  failed {f['failed']:4d}  swaps {f['swaps']:3d}  "
            f"p50 {f.get('p50_ms', 0):8.1f} ms  p95 {f.get('p95_ms', 0):8.1f} ms  max {f.get('max_ms', 0):8.1f} ms  "
            f"({', '.join(f'{m} {n}' for m, n in sorted(f['per_model'].items()))})"
        )
    if today["thrash"]["completed"]:
        gain = policy["thrash"]["completed"] / today["thrash"]["completed"]
        print(f"  the policy completes {gain:.2f}x today's requests")
    print(f"isolation: realtime time to first token on one worker (max_num_seqs {args.max_seqs})")
    for phase in ("alone", "beside_interactive", "beside_batch"):
        t, p = today["isolation"][phase], policy["isolation"][phase]
        print(
            f"  {phase:19s} today p50 {t.get('p50_ms', 0):7.1f} / p95 {t.get('p95_ms', 0):7.1f} ms   "
            f"policy p50 {p.get('p50_ms', 0):7.1f} / p95 {p.get('p95_ms', 0):7.1f} ms"
        )
    d = policy["deadline"]
    print("deadline: a realtime request for a cold model whose fallback is ready")
    for kind in ("with_deadline", "without"):
        print(f"  {kind:14s} p50 {d[kind].get('p50_ms', 0):8.1f} ms  p95 {d[kind].get('p95_ms', 0):8.1f} ms")
    print(f"  served by the fallback: {d['served_by_fallback']} of {d['with_deadline'].get('n', 0)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="the thrash run, per stack")
    p.add_argument("--clients", type=int, default=3, help="clients per model in the thrash run")
    p.add_argument("--tokens", type=int, default=16, help="tokens per thrash request")
    p.add_argument("--tps", type=float, default=50.0, help="the fake engine's tokens per second per stream")
    p.add_argument("--load-delay", type=float, default=3.0, help="the fake engine's cold start, s")
    p.add_argument("--max-seqs", type=int, default=4, help="requests the isolation worker runs at once")
    p.add_argument("--long-tokens", type=int, default=100, help="tokens per background request in isolation")
    p.add_argument("--isolation-seconds", type=float, default=15.0, help="per phase")
    p.add_argument("--deadline-rounds", type=int, default=4)
    p.add_argument("--residency", type=float, default=10.0, help="placement.min_residency_s of the policy")
    p.add_argument("--drain", type=int, default=32, help="placement.drain_queue_before_swap of the policy")
    p.add_argument("--cap", type=int, default=2, help="gateway.non_realtime_cap_per_worker of the policy")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    models_dir = WORK_ROOT / f"sched-models-{os.getpid()}"
    make_model_dir(models_dir / "m", QWEN2_CONFIG)
    box = SysBox.boot(share=(WORK_ROOT,))
    try:
        figures: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
        for name in ("today", "policy"):
            figures[name] = run_stack(box, args, name, models_dir)
    finally:
        box.stop()
    report(figures, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
