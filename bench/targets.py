"""Where a benchmark sends requests: a base URL, or a worker's unix socket
written ``unix:/run/ssw/workers/<dir>/http.sock`` (workers have no TCP port;
the benchmarks run as root, as the loader does, to reach them directly)."""

from __future__ import annotations

import argparse

import aiohttp


def session(target: str, timeout: float | None = None) -> tuple[aiohttp.ClientSession, str]:
    """A client session for the target and the base URL to put paths after."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    if target.startswith("unix:"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=target[5:], limit=0)
        return aiohttp.ClientSession(connector=connector, timeout=client_timeout), "http://worker"
    connector = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=client_timeout), target.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-root",
        default="/",
        help="where the workers' file system is seen from here: / on a host; for the demo, "
        "/proc/$(cat .cache/demo.pid)/root (its workers' sockets are inside the disposable host)",
    )


def worker_target(worker: dict[str, object], root: str = "/") -> str:
    """A worker of GET /status as a target."""
    return f"unix:{root.rstrip('/')}{worker['socket']}"
