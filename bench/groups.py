"""A model across two hosts against the same model on one host, side by side in one run.

    python bench/groups.py --json bench/results/groups.json     # as root; about 10 minutes

It brings up the two-host test fleet (tests/harness/fleet.py: two disposable
systemd hosts, each in its own network namespace, on one Redis over TLS) with
real vLLM on the CPU, and the tests' tiny model twice in models.yaml: ``one``
on one host, ``two`` across both hosts (tensor parallel 2, one rank per host,
over gloo on the hosts' veth link). For each, one after the other (the other
unloaded):

1. **cold start**: a chat through host A's gateway while the model is loaded
   nowhere, ``--loads`` times (unloaded between): the first of them also
   builds vLLM's compile cache, the later ones find it;
2. **tokens per second**: one stream of ``--tokens`` tokens, then
   ``--streams`` concurrent streams of as many, through host A's gateway
   (``ignore_eos``: every stream runs its full length), counted from each
   stream's usage.

Expect the CPU to be slower across "hosts": both ranks share this machine's 2
cores, and every layer's all-reduce crosses a TCP socket. The point is the
measured cost of the hop, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import QWEN2_CONFIG, make_model_dir
from tests.harness.fleet import FleetHost, two_hosts
from tests.harness.groups import unload_everywhere
from tests.harness.stack import WORK_ROOT, http, tiny_model_dir

LOAD_S = 600


def chat(host: FleetHost, model: str, tokens: int = 4) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": tokens}
    status, _, answer = http(
        "POST", host.public + "/v1/chat/completions", body, headers={"X-SSW-Wait": "true"}, timeout=LOAD_S
    )
    if status != 200:
        raise RuntimeError(f"{model}: {status} {answer}")
    return answer


def stream(host: FleetHost, model: str, tokens: int) -> tuple[int, float]:
    """(tokens generated, seconds from the request to the last byte)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    status, _, text = http("POST", host.public + "/v1/chat/completions", body, timeout=LOAD_S)
    took = time.monotonic() - started
    if status != 200:
        raise RuntimeError(f"{model}: {status} {text}")
    generated = 0
    for line in str(text).splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            usage = json.loads(line[6:]).get("usage") or {}
            generated = max(generated, int(usage.get("completion_tokens") or 0))
    return generated, took


def measure(hosts: tuple[FleetHost, FleetHost], model: str, args: argparse.Namespace) -> dict[str, Any]:
    a = hosts[0]
    loads = []
    for _ in range(args.loads):
        unload_everywhere(hosts, model, ask_s=300, wait_s=300)
        started = time.monotonic()
        chat(a, model)
        loads.append(round(time.monotonic() - started, 1))
        print(f"  {model}: cold start {loads[-1]:.1f} s", flush=True)
    placed = {h.name: [w["rank"] for w in h.workers(model)] for h in hosts}
    generated, took = stream(a, model, args.tokens)
    one = {"tokens": generated, "seconds": round(took, 2), "tokens_per_s": round(generated / took, 1)}
    print(f"  {model}: one stream {one['tokens_per_s']} tokens/s", flush=True)
    started = time.monotonic()
    with ThreadPoolExecutor(args.streams) as pool:
        results = list(pool.map(lambda _: stream(a, model, args.tokens), range(args.streams)))
    wall = time.monotonic() - started
    total = sum(n for n, _ in results)
    many = {
        "streams": args.streams,
        "tokens": total,
        "seconds": round(wall, 2),
        "tokens_per_s": round(total / wall, 1),
        "per_stream_tokens_per_s": round(sum(n / t for n, t in results) / len(results), 2),
    }
    print(f"  {model}: {args.streams} streams {many['tokens_per_s']} tokens/s in all", flush=True)
    unload_everywhere(hosts, model, ask_s=300, wait_s=300)
    return {"cold_start_s": loads, "ranks": placed, "one_stream": one, "concurrent": many}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", type=int, default=2, help="cold starts per model")
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams")
    p.add_argument(
        "--engine",
        choices=("vllm", "fake"),
        default="vllm",
        help="fake: the tests' stand-in (a quick check of the script)",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    if args.engine == "fake":
        tiny = WORK_ROOT / f"bench-groups-models-{os.getpid()}" / "tiny-qwen"
        make_model_dir(tiny, QWEN2_CONFIG)
    else:
        tiny = tiny_model_dir()
    models = {
        "one": {"path": tiny.name, "vram_gb": 2},
        "two": {"path": tiny.name, "vram_gb": 2, "hosts": 2, "tensor_parallel_size": 2},
    }
    extra = {"health": {"start_timeout_s": LOAD_S}, "gateway": {"wait_timeout_s": LOAD_S}}
    figures: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    settings = {"heartbeat_s": 1.0, "ttl_s": 6.0}
    with two_hosts("bench-groups", tiny.parent, models, settings, extra, args.engine) as fleet:
        for model in ("one", "two"):
            figures[model] = measure(fleet.hosts, model, args)
    one, two = figures["one"], figures["two"]
    print("a model across two hosts (tensor parallel 2, gloo over a veth link) against one host, real vLLM on the CPU")
    print(f"  cold start      one host {one['cold_start_s']} s   two hosts {two['cold_start_s']} s")
    print(
        f"  one stream      one host {one['one_stream']['tokens_per_s']} tokens/s   "
        f"two hosts {two['one_stream']['tokens_per_s']} tokens/s"
    )
    print(
        f"  {args.streams} streams      one host {one['concurrent']['tokens_per_s']} tokens/s   "
        f"two hosts {two['concurrent']['tokens_per_s']} tokens/s"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
