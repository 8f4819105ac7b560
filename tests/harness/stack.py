"""Helpers that run ssw's roles as real processes against a disposable systemd
host, for the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import redis
import yaml

REPO = Path(__file__).resolve().parents[2]
SSW_VENV = Path(os.environ.get("SSW_VENV", REPO / ".venvs/ssw"))
VLLM_VENV = Path(os.environ.get("SSW_VLLM_VENV", REPO / ".venvs/vllm"))
FAKE_VLLM_PATH = REPO / "tests/harness/fakevllm"
# Not under /tmp or /var/tmp: the disposable host mounts a fresh /tmp, and the
# services' PrivateTmp hides /var/tmp from them.
WORK_ROOT = Path(os.environ.get("SSW_TEST_ROOT", "/var/lib/ssw-tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# Admin base URL -> the file holding its token: http() sends it to those URLs,
# as the CLI does, unless a test sets Authorization itself.
ADMIN_TOKENS: dict[str, Path] = {}


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], Any]:
    """(status, lower-cased headers, parsed JSON or text) without raising on 4xx/5xx."""
    headers = dict(headers or {})
    for base, token_file in ADMIN_TOKENS.items():
        if url.startswith(base + "/") and "Authorization" not in headers and token_file.exists():
            headers["Authorization"] = "Bearer " + token_file.read_text().strip()
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        # An error answer holds its connection until closed; left to the garbage
        # collector it is a ResourceWarning in whichever test runs then.
        with exc:
            status, hdrs, raw = exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()  # else collected, unclosed, during some later test
            raise
        self.sock = sock


def worker_http(sock: str, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """A request straight to a worker's unix socket (the tests run as root, as the
    loader does): (status, parsed JSON or text)."""
    conn = _UnixConnection(sock, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def socket_open(sock: str) -> bool:
    """Whether something accepts connections on this unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(sock) == 0


def http_in_background(method: str, url: str, body: Any, timeout: float) -> tuple[threading.Thread, dict[str, Any]]:
    """A request on its own thread (a stream to interrupt, drain or evict under);
    the dict gets its status and body when it ends."""
    result: dict[str, Any] = {}

    def run() -> None:
        result["status"], _, result["body"] = http(method, url, body, timeout=timeout)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def timed_posts(url: str, path: str, body: bytes, n: int, headers: dict[str, str] | None = None) -> list[float]:
    """Seconds each of ``n`` POSTs took, one after another on one kept-alive connection;
    any answer but 200 is an error (the benchmarks and the latency tests share it)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = HTTPConnection(host, int(port), timeout=30)
    sent = {"Content-Type": "application/json", **(headers or {})}
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", path, body, sent)
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - t0)
            if resp.status != 200:
                raise RuntimeError(f"{url}{path} answered {resp.status}")
    finally:
        conn.close()
    return out


def percentile(samples: list[float], p: float) -> float:
    """The ``p`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_config(
    directory: Path,
    *,
    bus_address: str,
    journal_dir: Path | None,
    models_dir: Path,
    models: dict[str, Any],
    engine: str,
    public_port: int,
    admin_port: int,
    extra: dict[str, Any] | None = None,
    redis_url: str = "redis://127.0.0.1:1/0",
    splits: dict[str, Any] | None = None,
) -> Path:
    """A config for a test stack; engine 'fake' (fast stand-in) or 'vllm' (real, CPU).
    Without a redis_url, metrics go nowhere (and are counted as dropped)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "models.yaml").write_text(yaml.safe_dump({"models": models, **({"splits": splits} if splits else {})}))
    if engine == "vllm":
        vllm = {
            "python": str(VLLM_VENV / "bin/python"),
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"},
            "extra_args": ["--dtype", "bfloat16", "--max-model-len", "1024"],
        }
    else:
        vllm = {"python": sys.executable, "env": {"PYTHONPATH": str(FAKE_VLLM_PATH)}}
    cfg: dict[str, Any] = {
        "public": {"host": "127.0.0.1", "port": public_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "models_dir": str(models_dir),
        "models_file": str(directory / "models.yaml"),
        "state_dir": str(directory / "state"),
        "gpus": {
            "source": "simulated",
            "simulated": [{"name": "Simulated A40", "memory_gb": 48}, {"name": "Simulated A40", "memory_gb": 48}],
        },
        "vllm": vllm,
        # Shared with the disposable host (same path inside): workers create their
        # sockets there, and the roles, running out here, reach them.
        "workers": {"socket_dir": str(directory / "sockets"), "stop_timeout_s": 10, "drain_timeout_s": 10},
        "health": {"interval_s": 0.25, "check_interval_s": 1.0, "start_timeout_s": 300},
        "gateway": {"loader_url": f"http://127.0.0.1:{admin_port}", "wait_timeout_s": 120},
        "systemd": {"bus_address": bus_address, "journal_directory": str(journal_dir) if journal_dir else None},
        "redis_url": redis_url,
        "batch": {"dir": str(directory / "batches")},
        # Auth has its own tests; elsewhere the public API is open (said explicitly).
        "auth": {
            "enabled": False,
            "keys_file": str(directory / "keys.yaml"),
            "admin_token_file": str(directory / "admin.token"),
            "gateway_token_file": str(directory / "gateway.token"),
        },
        "log_level": "info",
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Role:
    """One ssw role (gateway, loader or serve) as a foreground process."""

    def __init__(self, role: str, config: Path, log_dir: Path, netns: str | None = None) -> None:
        self.role = role
        self.config = config
        self.log_path = log_dir / f"{role}.log"
        self.netns = netns  # a network namespace of its own (a host of a test fleet)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Role:
        log = self.log_path.open("ab")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, str(SSW_VENV / "bin/ssw"), "--config", str(self.config), self.role],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def wait_healthy(self, url: str, timeout: float = 30) -> Role:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"ssw {self.role} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return http("GET", url + "/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ok, timeout, f"ssw {self.role} at {url}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisServer:
    """Debian's redis-server on a free port (loopback, or ``host``), without persistence;
    with ``password``, only for those who give it (as a fleet's Redis)."""

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.port = free_port()
        self.host = host
        self.password = password
        self.tls = tls  # (CA, certificate, key): TLS only (rediss://), clients' certificates checked if sent
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                *(
                    [
                        "--port",
                        "0",
                        "--tls-port",
                        str(self.port),
                        "--tls-ca-cert-file",
                        str(self.tls[0]),
                        "--tls-cert-file",
                        str(self.tls[1]),
                        "--tls-key-file",
                        str(self.tls[2]),
                        "--tls-auth-clients",
                        "optional",
                    ]
                    if self.tls
                    else ["--port", str(self.port)]
                ),
                "--bind",
                self.host,
                *(["--requirepass", self.password] if self.password else []),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port, self.host), 10, "redis-server")
        return self

    def client(self, **kw: Any) -> redis.Redis:
        """A client of this server, closed when the server stops (an unclosed one is a
        ResourceWarning in whichever test the garbage collector runs in)."""
        if self.tls:
            kw = {"ssl_ca_certs": str(self.tls[0]), **kw}
        c = redis.Redis.from_url(self.url, **kw)
        self._clients.append(c)
        return c

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def make_tiny_model(out: Path) -> Path:
    """A tiny random Qwen2 model in ``out``, made by the vLLM environment's Python (deterministic)."""
    subprocess.run(
        [str(VLLM_VENV / "bin/python"), str(REPO / "tests/harness/make_tiny_model.py"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def tiny_model_dir() -> Path:
    """The tests' tiny model, made once and kept between runs."""
    out = WORK_ROOT / "tiny-models" / "tiny-qwen"
    return out if (out / "config.json").exists() else make_tiny_model(out)
