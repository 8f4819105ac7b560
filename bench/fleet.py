"""The fleet's costs: the cross-host hop, and single flight under load.

    python bench/fleet.py --json bench/results/fleet.json     # as root, about a minute

It brings up its own fleets of two hosts on this machine (tests/harness/fleet.py:
each a disposable systemd host in its own network namespace, the fake engine,
one Redis on a bridge), one after the other in one run: the fleet as shipped
(mutual TLS between gateways and to Redis, signed hops) and the same fleet
with ``fleet.insecure`` (plain http and redis, the hops still signed), and
measures:

1. **hop**: a model ready on host B only. The same request, one client on a
   kept-alive connection, in alternating rounds to B's gateway and to A's
   (which relays it to B's): the added latency of the hop is the difference
   of the medians, with p99s. The fake engine answers at once, so the
   gateways' share stands out. Also: what making and checking one claim
   costs (HMAC-SHA256 over its JSON), in microseconds.
2. **single flight**: ``--clients`` clients, spread over both gateways, ask at
   once for a model loaded nowhere (its engine takes ``--load-delay`` s to
   start). Reported: units started fleet-wide (one is right), and when the
   clients were answered.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssw.gateway import hops
from tests.harness.fleet import FleetHost, Network, Pki, fleet_redis_server, fleet_secret
from tests.harness.stack import WORK_ROOT, http, percentile, timed_posts, wait_for

CHAT = [{"role": "user", "content": "hi"}]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--models-dir", type=Path, help="model directories (default: two generated fakes)")
    p.add_argument("--requests", type=int, default=2000, help="hop: requests per target and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=100, help="single flight: clients at once")
    p.add_argument("--load-delay", type=float, default=2.0)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def timed(url: str, body: bytes, n: int) -> list[float]:
    return timed_posts(url, "/v1/chat/completions", body, n)


def pct(values: list[float], p: float) -> float:
    return percentile(values, p) * 1000


def hop_ready_on_b(a: FleetHost, b: FleetHost) -> bool:
    status, _, models = http("GET", a.public + "/v1/models")
    entry = next((m for m in models["data"] if m["id"] == "hop"), None) if status == 200 else None
    return bool(entry and entry["ssw"].get("hosts", {}).get(b.name) == "ready")


def hop(a: FleetHost, b: FleetHost, args: argparse.Namespace) -> dict[str, Any]:
    body = json.dumps({"model": "hop", "messages": CHAT, "max_tokens": 1}).encode()
    assert b.admin("POST", "/load", {"model": "hop"})[0] == 200
    wait_for(lambda: hop_ready_on_b(a, b), 30, "A to see hop ready on B")
    timed(b.public, body, 200)  # warm both paths
    timed(a.public, body, 200)
    direct: list[float] = []
    through: list[float] = []
    for _ in range(args.rounds):
        direct += timed(b.public, body, args.requests)
        through += timed(a.public, body, args.requests)
    assert not a.workers("hop"), "A loaded the model itself"
    d50, t50 = statistics.median(direct) * 1000, statistics.median(through) * 1000
    return {
        "requests": len(direct),
        "b_direct": {"p50_ms": round(d50, 3), "p99_ms": round(pct(direct, 0.99), 3)},
        "a_to_b": {"p50_ms": round(t50, 3), "p99_ms": round(pct(through, 0.99), 3)},
        "added_p50_ms": round(t50 - d50, 3),
        "added_p99_ms": round(pct(through, 0.99) - pct(direct, 0.99), 3),
    }


def single_flight(a: FleetHost, b: FleetHost, args: argparse.Namespace) -> dict[str, Any]:
    for host in (a, b):
        host.admin("POST", "/unload", {"model": "burst"})
    wait_for(lambda: not a.workers("burst") and not b.workers("burst"), 60, "burst unloaded")
    body = json.dumps({"model": "burst", "messages": CHAT, "max_tokens": 1}).encode()
    starts_before = sum(h.loader.log().count("ssw-worker@burst.service: starting (GPU") for h in (a, b))
    t0 = time.perf_counter()

    def one(i: int) -> float:
        timed((a if i % 2 else b).public, body, 1)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(args.clients) as pool:
        answered = list(pool.map(one, range(args.clients)))
    starts = sum(h.loader.log().count("ssw-worker@burst.service: starting (GPU") for h in (a, b)) - starts_before
    units = len(a.workers("burst")) + len(b.workers("burst"))
    return {
        "clients": args.clients,
        "load_delay_s": args.load_delay,
        "units_started": starts,
        "workers_after": units,
        "first_answer_s": round(min(answered), 2),
        "last_answer_s": round(max(answered), 2),
        "median_answer_s": round(statistics.median(answered), 2),
    }


def claim_cost(n: int = 20_000) -> dict[str, float]:
    """Microseconds to make one claim, and to check one (signature, fields, nonce, body)."""
    secret, body = secrets.token_bytes(32), b'{"model": "hop", "messages": [], "max_tokens": 1}' * 4
    made = [
        hops.make(secret, iss="a", aud="b", key="k", priority="interactive", wait=True, fallback=None,
                  method="POST", path="/v1/chat/completions", body=body).encode()
        for _ in range(n)
    ]  # fmt: skip
    t0 = time.perf_counter()
    for _ in range(n):
        hops.make(secret, iss="a", aud="b", key="k", priority="interactive", wait=True, fallback=None,
                  method="POST", path="/v1/chat/completions", body=body)  # fmt: skip
    make_us = (time.perf_counter() - t0) / n * 1e6
    verifier = hops.Verifier("b")
    t0 = time.perf_counter()
    for header in made:
        hops.check_body(verifier.check(secret, header, "POST", "/v1/chat/completions"), body)
    return {"make_us": round(make_us, 1), "check_us": round((time.perf_counter() - t0) / n * 1e6, 1)}


def measure(root: Path, models: Path, specs: dict[str, Any], args: argparse.Namespace, tls: bool) -> dict[str, Any]:
    net = Network().up()
    pki = Pki(root / "pki") if tls else None
    redis = fleet_redis_server(root, net, pki)
    token = fleet_secret(root)
    fleet = {"redis_url": redis.url, "credential_file": str(token), "heartbeat_s": 0.5, "ttl_s": 5}
    hosts: list[FleetHost] = []
    extra = {"gateway": {"access_log": False}}
    try:
        for index in (1, 2):
            hosts.append(FleetHost.start(net, index, root, models, specs, fleet, extra, pki))
        a, b = hosts
        wait_for(lambda: len((a.health().get("fleet") or {}).get("hosts", [])) == 2, 30, "the fleet")
        what = "TLS" if tls else "plain http"
        print(f"hop ({what}): a model ready on B, through B's gateway and through A's", file=sys.stderr)
        result = {"hop": hop(a, b, args)}
        if tls:
            print(f"single flight: {args.clients} clients over both gateways", file=sys.stderr)
            result["single_flight"] = single_flight(a, b, args)
        return result
    finally:
        for host in hosts:
            host.stop()
        redis.stop()
        net.down()


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        sys.exit("bench/fleet.py boots disposable systemd hosts: run it as root")
    root = WORK_ROOT / f"bench-fleet-{secrets.token_hex(3)}"
    models = args.models_dir or root / "models"
    if args.models_dir is None:
        for name in ("fake-a", "fake-b"):
            (models / name).mkdir(parents=True)
            (models / name / "config.json").write_text(
                json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
            )
            (models / name / "model.safetensors").write_bytes(b"\0" * 1024)
    specs = {
        "hop": {"path": "fake-a", "vram_gb": 2},
        "burst": {"path": "fake-b", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": str(args.load_delay)}},
    }
    secure = measure(root / "tls", models, specs, args, tls=True)
    plain = measure(root / "plain", models, specs, args, tls=False)
    result = {
        "hop": secure["hop"],  # as shipped: mutual TLS and signed claims
        "hop_plain": plain["hop"],  # fleet.insecure: plain http, claims still signed
        "claim": claim_cost(),
        "single_flight": secure["single_flight"],
    }
    h, p, c, s = result["hop"], result["hop_plain"], result["claim"], result["single_flight"]
    print(f"{'path':<22} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in (("B direct", h["b_direct"]), ("A -> B, TLS", h["a_to_b"]),
                      ("B direct (plain run)", p["b_direct"]), ("A -> B, plain http", p["a_to_b"])):  # fmt: skip
        print(f"{name:<22} {row['p50_ms']:>8} {row['p99_ms']:>8}")
    print(f"the hop adds {h['added_p50_ms']} ms p50, {h['added_p99_ms']} ms p99 over TLS "
          f"({p['added_p50_ms']} / {p['added_p99_ms']} ms in plain http; {h['requests']} requests each)")  # fmt: skip
    print(f"a claim: {c['make_us']} us to make, {c['check_us']} us to check")
    print(
        f"single flight: {s['clients']} clients, {s['units_started']} unit started fleet-wide; "
        f"answered {s['first_answer_s']}-{s['last_answer_s']} s after asking (load delay {s['load_delay_s']} s)"
    )
    if args.json:
        out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args) | {"json": None}, **result}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
