"""The demo stack: a disposable systemd host running ssw's units, Redis and a
real vLLM worker on the CPU, serving OpenAI on :8000.

    python -m tests.harness.demo up | down | status
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.harness.hostinstall import install_units
from tests.harness.stack import REPO, VLLM_VENV, http, wait_for
from tests.harness.sysbox import SysBox

CONFIG = REPO / "etc/ssw/demo/config.yaml"
MODELS = REPO / ".cache/demo-models"
PIDFILE = REPO / ".cache/demo.pid"


def up() -> None:
    if PIDFILE.exists() and Path(f"/proc/{PIDFILE.read_text().strip()}").exists():
        sys.exit(f"the demo is already up (systemd PID {PIDFILE.read_text().strip()}); run 'down' first")
    print("demo: generating the tiny model")
    subprocess.run(
        [str(VLLM_VENV / "bin/python"), str(REPO / "tests/harness/make_tiny_model.py"), str(MODELS / "tiny-qwen")],
        check=True,
        capture_output=True,
    )
    print("demo: booting a disposable systemd host")
    box = SysBox.boot()
    PIDFILE.parent.mkdir(parents=True, exist_ok=True)
    PIDFILE.write_text(str(box.pid))
    install_units(box, CONFIG)
    box.systemctl("start", "redis-server.service")
    started = box.systemctl("start", "ssw.target")
    if started.returncode != 0:
        print(box.run("journalctl", "-u", "ssw-loader", "-u", "ssw-gateway", "-n", "50", "--no-pager").stdout)
        sys.exit(f"demo: ssw.target failed to start: {started.stderr.strip()}")
    print("demo: ssw is up; waiting for the pinned model 'tiny' (real vLLM on the CPU, about a minute)")

    def tiny_ready() -> bool:
        try:
            status, _, body = http("GET", "http://127.0.0.1:8001/status", timeout=5)
        except OSError:
            return False
        return status == 200 and any(w["model"] == "tiny" and w["state"] == "ready" for w in body["workers"])

    t0 = time.monotonic()
    wait_for(tiny_ready, 600, "the tiny model to load", interval=1)
    print(f"demo: ready in {time.monotonic() - t0:.0f} s. OpenAI API on http://127.0.0.1:8000/v1")
    print(
        "  try:  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "light", "messages": [{"role": "user", "content": "hi"}]}\''
    )
    print(f"  host: nsenter -t {box.pid} -m -p systemctl status ssw-worker@tiny")
    print(f"        nsenter -t {box.pid} -m -p journalctl -u ssw-worker@tiny")
    print(f"  cli:  .venvs/ssw/bin/ssw -c {CONFIG.relative_to(REPO)} status")
    print("  stop: .venvs/ssw/bin/python -m tests.harness.demo down")


def down() -> None:
    if not PIDFILE.exists():
        print("demo: not up")
        return
    SysBox(int(PIDFILE.read_text().strip()), Path("/nonexistent")).stop()
    PIDFILE.unlink()
    print("demo: stopped; nothing was left on this machine")


def status() -> None:
    if not PIDFILE.exists():
        sys.exit("demo: not up")
    box = SysBox(int(PIDFILE.read_text().strip()), Path("/nonexistent"))
    print(box.systemctl("status", "ssw.target", "ssw-gateway", "ssw-loader", "ssw-workers.slice").stdout)


if __name__ == "__main__":
    {"up": up, "down": down, "status": status}.get(
        sys.argv[1] if len(sys.argv) > 1 else "",
        lambda: sys.exit("usage: python -m tests.harness.demo up | down | status"),
    )()
