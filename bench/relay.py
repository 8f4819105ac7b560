"""The relay, side by side in one run: the same requests to the same worker,
straight to it, through nginx, through ssw's gateway (1 and N processes) and
through LiteLLM, in alternating rounds, with wrk (one thread, a Lua body), so
that the load generator costs little of the CPU the relays share.

    python bench/relay.py --config etc/ssw/demo/config.yaml --box $(cat .cache/demo.pid) \\
        --api-key-file .cache/demo-key --json bench/results/relay.json --plot bench/results/relay.png

Workers serve on a unix socket only. For a baseline that wrk can reach, the
fake engine (models with SSW_FAKE_TCP_PORT) also listens on TCP inside its own
network namespace: "direct" and LiteLLM (which speaks TCP only) run there,
entered with nsenter. nginx (1 worker process, upstream keepalive,
proxy_buffering off) proxies to the socket as ssw does. The benchmark starts
its own gateways next to the stack's, against the same loader, so it can run
1 and N processes in one run; with --box (the demo's disposable host) they and
nginx run inside that host's mount namespace, where the socket paths are.

Workloads: short (a chat answer of 8 tokens), stream (64 streamed tokens), on
the fake engine; vllm-stream (64 streamed tokens from real vLLM; only nginx
and ssw can reach a vLLM worker, it has no TCP port).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import admin_api
import yaml

REPO = Path(__file__).resolve().parents[1]
LITELLM = "litellm[proxy]==1.108.7"
BENCH_VENV = REPO / ".venvs/bench"
CHAT = [{"role": "user", "content": "Say something."}]
WORKLOADS = {
    "short": {"max_tokens": 8, "stream": False},
    "stream": {"max_tokens": 64, "stream": True},
    "vllm-stream": {"max_tokens": 64, "stream": True},
}
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
local key = os.getenv("BENCH_KEY")
if key ~= nil and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def wait_up(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status < 500:
                return
        time.sleep(0.25)
    sys.exit(f"relay: {what} did not come up at {url} within {timeout:.0f} s")


class Host:
    """Where the stack's files are: this machine, or a disposable host (--box)."""

    def __init__(self, box: int | None) -> None:
        self.box = box

    def path(self, inside: str) -> Path:
        """A path inside the host, as seen from here."""
        return Path(f"/proc/{self.box}/root{inside}") if self.box else Path(inside)

    def prefix(self) -> list[str]:
        """What runs a command inside the host's mount and PID namespaces."""
        return ["nsenter", "-t", str(self.box), "-m", "-p", "--"] if self.box else []


def worker_of(admin: str, headers: dict[str, str], model: str) -> dict[str, Any]:
    body = http_json("POST", admin + "/load", {"model": model, "wait": True}, headers)
    return dict(body["workers"][0])


def engine_pid(socket_path: str) -> int:
    """The host PID of the process serving on a worker's socket (its --uds argument)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"--uds" in argv and argv[argv.index(b"--uds") + 1].decode() == socket_path:
                return int(entry.name)
    sys.exit(f"relay: no process serves on {socket_path}")


def tcp_port(pid: int) -> int | None:
    env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    port = env.get(b"SSW_FAKE_TCP_PORT")
    return int(port) if port else None


def netns(pid: int) -> list[str]:
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--"]


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@contextlib.contextmanager
def nginx(host: Host, sock: str, port: int, work: Path) -> Iterator[str]:
    inside = f"/tmp/ssw-bench-nginx-{port}"
    host.path(inside).mkdir(parents=True, exist_ok=True)
    conf = f"""user ssw ssw;
worker_processes 1;
daemon off;
pid {inside}/nginx.pid;
error_log {inside}/error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  upstream worker {{ server unix:{sock}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://worker;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""
    host.path(f"{inside}/nginx.conf").write_text(conf)
    with process([*host.prefix(), "nginx", "-c", f"{inside}/nginx.conf"], work / "nginx.log"):
        wait_up(f"http://127.0.0.1:{port}/health", 30, "nginx")
        yield f"http://127.0.0.1:{port}"
    shutil.rmtree(host.path(inside), ignore_errors=True)


# ssw's gateway as shipped, but its public port on uvicorn's plain httptools protocol
# instead of the edge's (ssw/edge.py): what the edge limits cost, measured in the same run.
PLAIN_EDGE = (
    "import sys, ssw.service as s; s.edge_protocol = lambda limits: ('httptools', None); "
    "from ssw.cli import main; sys.exit(main())"
)


# ssw's gateway from another checkout of the repository (--baseline: the commit before a
# change, say), against the same loader, in the same run: a change's cost, measured.
BASELINE = "import sys; from ssw.cli import main; sys.exit(main())"


class OtlpSink:
    """An OTLP/HTTP endpoint that takes every export and keeps only counts (the
    ssw-traced target's collector: what tracing costs the gateway, not a collector)."""

    def __init__(self) -> None:
        sink = self
        self.exports = 0
        self.bytes = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(size)
                sink.exports += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def gateway(
    host: Host,
    config: Path,
    processes: int,
    work: Path,
    edge: bool = True,
    baseline: Path | None = None,
    tracing: str | None = None,
    trace_ratio: float = 1.0,
) -> Iterator[str]:
    """ssw's gateway with N processes on a port of its own, against the stack's loader
    (``edge=False``: without the public port's protocol limits; ``baseline``: the code of
    that checkout; ``tracing``: spans to that OTLP endpoint; all for comparison)."""
    sys.path.insert(0, str(REPO / "daemon"))
    from ssw.config import load_config

    # What the file sets, not every default: a --baseline checkout may not know the newest keys.
    cfg = load_config(config).model_dump(mode="json", exclude_unset=True)
    port = free_port()
    cfg["public"] = {"host": "127.0.0.1", "port": port}
    cfg["gateway"] = {**cfg.get("gateway", {}), "processes": processes, "metrics_listen": None}
    if tracing is not None:
        cfg["tracing"] = {"otlp_endpoint": tracing, "sample_ratio": trace_ratio}
    inside = f"/tmp/ssw-bench-gateway-{port}.yaml"
    host.path(inside).write_text(yaml.safe_dump(cfg))
    argv = [*host.prefix(), str(REPO / ".venvs/ssw/bin/ssw"), "--config", inside, "gateway"]
    env = None
    if not edge:
        argv[len(host.prefix()) : len(host.prefix()) + 1] = [str(REPO / ".venvs/ssw/bin/python"), "-c", PLAIN_EDGE]
    if baseline is not None:
        argv[len(host.prefix()) : len(host.prefix()) + 1] = [str(REPO / ".venvs/ssw/bin/python"), "-c", BASELINE]
        # Before the editable install's path: that checkout's package is the one imported.
        env = {**os.environ, "PYTHONPATH": str(baseline / "daemon")}
    suffix = "-plain" if not edge else "-baseline" if baseline is not None else "-traced" if tracing else ""
    with process(argv, work / f"gateway-{processes}{suffix}.log", env):
        wait_up(f"http://127.0.0.1:{port}/health", 60, f"ssw's gateway ({processes} processes)")
        # Healthy is not yet following the loader: wait for its first snapshot.
        deadline = time.monotonic() + 30
        while not http_json("GET", f"http://127.0.0.1:{port}/health").get("loader_connected"):
            if time.monotonic() > deadline:
                sys.exit("relay: the benchmark's gateway did not reach the loader")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    host.path(inside).unlink(missing_ok=True)


def litellm_venv() -> Path:
    exe = BENCH_VENV / "bin/litellm"
    if not exe.exists():
        print(f"relay: installing {LITELLM} in {BENCH_VENV} (about a minute, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin/pip"), "install", "-q", LITELLM], check=True)
    return exe


@contextlib.contextmanager
def litellm(pid: int, model: str, backend_port: int, work: Path) -> Iterator[tuple[int, str]]:
    """LiteLLM's proxy in the worker's network namespace, in front of its TCP port;
    (its port, its master key: it checks keys, as ssw does)."""
    exe = litellm_venv()
    port = free_port()
    master_key = "sk-bench-" + secrets.token_hex(16)
    cfg = work / "litellm.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": model,
                        "litellm_params": {
                            "model": f"openai/{model}",
                            "api_base": f"http://127.0.0.1:{backend_port}/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "litellm_settings": {"telemetry": False},
            }
        )
    )
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DO_NOT_TRACK": "1",
    }
    argv = [*netns(pid), str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    with process(argv, work / "litellm.log", env):
        deadline = time.monotonic() + 180
        while True:
            probe = subprocess.run(
                [
                    *netns(pid),
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    f"http://127.0.0.1:{port}/health/liveliness",
                ],
                capture_output=True,
                text=True,
            )
            if probe.stdout == "200":
                break
            if time.monotonic() > deadline:
                sys.exit(f"relay: LiteLLM did not come up; see {work / 'litellm.log'}")
            time.sleep(1)
        yield port, master_key


def wrk(
    url: str, workload: str, model: str, key: str, connections: int, duration: float, lua: Path, ns: list[str]
) -> dict[str, Any]:
    body = {"model": model, "messages": CHAT, "ignore_eos": True, **WORKLOADS[workload]}
    env = {**os.environ, "BENCH_BODY": json.dumps(body), "BENCH_KEY": key}
    argv = [
        *ns,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(duration, 1):.0f}s",
        "--latency",
        "-s",
        str(lua),
        url + "/v1/chat/completions",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 120).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups()[:3])

    def ms(m: re.Match[str] | None) -> float | None:
        if m is None:
            return None
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    return {"rps": float(rps.group(1)) if rps else 0.0, "p50_ms": ms(p50), "p99_ms": ms(p99), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", required=True, help="the stack's config.yaml (the benchmark's gateways are made from it)"
    )
    admin_api.add_arguments(p, "to load the models and find their workers")
    p.add_argument("--box", type=int, help="the PID of the disposable host the stack runs in (the demo's)")
    p.add_argument("--api-key-file", help="a key for ssw's gateway, when auth is on")
    p.add_argument("--model", default="bench-fake", help="a fake-engine model with SSW_FAKE_TCP_PORT")
    p.add_argument("--vllm-model", help="a real vLLM model, for vllm-stream")
    p.add_argument("--workloads", default="short,stream", help="short, stream, vllm-stream")
    p.add_argument(
        "--targets",
        default="direct,nginx,ssw,litellm",
        help="direct, nginx, ssw, ssw-plain (1 process, the public port without the edge's limits), "
        "ssw-baseline (1 process, the gateway of --baseline), ssw-traced (1 process, every request traced "
        "to an OTLP sink), litellm",
    )
    p.add_argument("--baseline", type=Path, help="another checkout of this repository, for the ssw-baseline target")
    p.add_argument("--trace-ratio", type=float, default=1.0, help="tracing.sample_ratio of the ssw-traced target")
    p.add_argument("--processes", default="1,2", help="gateway processes of the ssw targets")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per round and target")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-duration", type=float, default=5.0, help="the 1-connection run; 0: skip it")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG here")
    args = p.parse_args(argv)
    headers = admin_api.headers(args)
    key = Path(args.api_key_file).read_text().strip() if args.api_key_file else ""
    host = Host(args.box)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    processes = [int(n) for n in args.processes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ssw-bench-relay-"))
    lua = work / "body.lua"
    lua.write_text(LUA)
    results: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "wrk": "1 thread", "connections": args.connections},
        "duration_s": args.duration,
        "rounds": args.rounds,
        "workloads": {},
    }
    with contextlib.ExitStack() as stack:
        ssw_urls = {
            n: stack.enter_context(gateway(host, Path(args.config), n, work)) for n in processes if "ssw" in targets
        }
        plain_url = (
            stack.enter_context(gateway(host, Path(args.config), 1, work, edge=False))
            if "ssw-plain" in targets
            else None
        )
        if "ssw-baseline" in targets and args.baseline is None:
            sys.exit("relay: ssw-baseline needs --baseline")
        baseline_url = (
            stack.enter_context(gateway(host, Path(args.config), 1, work, baseline=args.baseline.resolve()))
            if "ssw-baseline" in targets and args.baseline is not None
            else None
        )
        sink = OtlpSink() if "ssw-traced" in targets else None
        if sink is not None:
            stack.callback(sink.close)
        traced_url = (
            stack.enter_context(
                gateway(host, Path(args.config), 1, work, tracing=sink.url, trace_ratio=args.trace_ratio)
            )
            if sink is not None
            else None
        )
        for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            model = args.vllm_model if workload == "vllm-stream" else args.model
            if model is None:
                sys.exit("relay: vllm-stream needs --vllm-model")
            worker = worker_of(args.admin, headers, model)
            pid = engine_pid(worker["socket"])
            backend = tcp_port(pid)
            sock = worker["socket"]
            plan: list[tuple[str, str, list[str], str]] = []  # (name, url, namespace prefix, key)
            with contextlib.ExitStack() as per_workload:
                for target in targets:
                    if target == "direct" and backend:
                        plan.append(("direct", f"http://127.0.0.1:{backend}", netns(pid), ""))
                    elif target == "nginx":
                        url = per_workload.enter_context(nginx(host, sock, free_port(), work))
                        plan.append(("nginx", url, [], ""))
                    elif target == "ssw":
                        plan += [(f"ssw-{n}p", url, [], key) for n, url in ssw_urls.items()]
                    elif target == "ssw-plain" and plain_url is not None:
                        plan.append(("ssw-plain-1p", plain_url, [], key))
                    elif target == "ssw-baseline" and baseline_url is not None:
                        plan.append(("ssw-baseline-1p", baseline_url, [], key))
                    elif target == "ssw-traced" and traced_url is not None:
                        plan.append(("ssw-traced-1p", traced_url, [], key))
                    elif target == "litellm" and backend:
                        port, master_key = per_workload.enter_context(litellm(pid, model, backend, work))
                        plan.append(("litellm", f"http://127.0.0.1:{port}", netns(pid), master_key))
                rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in plan}
                for _, url, ns, k in plan:  # warm-up: connections, caches, compiled paths
                    wrk(url, workload, model, k, args.connections, 2, lua, ns)
                for r in range(args.rounds):
                    for name, url, ns, k in plan:
                        res = wrk(url, workload, model, k, args.connections, args.duration, lua, ns)
                        rounds[name].append(res)
                        print(
                            f"{workload} round {r + 1} {name:>8}: {res['rps']:9.1f} req/s  p50 {res['p50_ms']} ms  "
                            f"p99 {res['p99_ms']} ms  errors {res['errors']}",
                            flush=True,
                        )
                one: dict[str, Any] = {}
                if args.latency_duration and workload == "short":
                    for name, url, ns, k in plan:
                        if name in ("direct", "nginx", "ssw-1p", "ssw-plain-1p", "ssw-baseline-1p", "ssw-traced-1p"):
                            one[name] = wrk(url, workload, model, k, 1, args.latency_duration, lua, ns)
            summary = {
                name: {
                    "rps_median": statistics.median(x["rps"] for x in rs),
                    "rps_range": [min(x["rps"] for x in rs), max(x["rps"] for x in rs)],
                    "p50_ms_median": statistics.median(x["p50_ms"] or 0 for x in rs),
                    "p99_ms_median": statistics.median(x["p99_ms"] or 0 for x in rs),
                    "errors": sum(x["errors"] for x in rs),
                    "rounds": rs,
                }
                for name, rs in rounds.items()
            }
            nginx_rps = summary.get("nginx", {}).get("rps_median")
            for entry in summary.values():
                entry["vs_nginx"] = round(entry["rps_median"] / nginx_rps, 3) if nginx_rps else None
            results["workloads"][workload] = {"model": model, "targets": summary, "one_connection": one}
        if sink is not None:
            results["otlp_sink"] = {"exports": sink.exports, "bytes": sink.bytes}
            print(f"the OTLP sink took {sink.exports} exports, {sink.bytes / 1e6:.1f} MB of spans", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print()
    for workload, data in results["workloads"].items():
        row = ", ".join(
            f"{name} {t['rps_median']:.0f} req/s ({t['rps_range'][0]:.0f}-{t['rps_range'][1]:.0f})"
            + (f" = {t['vs_nginx']:.2f}x nginx" if t["vs_nginx"] is not None and name != "nginx" else "")
            for name, t in data["targets"].items()
        )
        print(f"{workload}: {row}")
        if data["one_connection"]:
            latencies = ", ".join(f"{n} p50 {v['p50_ms']:.3f} ms" for n, v in data["one_connection"].items())
            print(f"{workload} at 1 connection: {latencies}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    bad = [f"{w}/{n}" for w, d in results["workloads"].items() for n, t in d["targets"].items() if t["errors"]]
    if bad:
        print(f"relay: errors in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        targets = results["workloads"][workload]["targets"]
        names = list(targets)
        values = [targets[n]["rps_median"] for n in names]
        errs = [
            [v - targets[n]["rps_range"][0] for n, v in zip(names, values, strict=True)],
            [targets[n]["rps_range"][1] - v for n, v in zip(names, values, strict=True)],
        ]
        ax.bar(names, values, yerr=errs, capsize=4)
        ax.set_title(f"{workload} ({results['machine']['connections']} connections)")
        ax.set_ylabel("requests/s (median, range of rounds)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
