"""The demo stack: a disposable systemd host running ssw's units, Redis and a
real vLLM worker on the CPU, serving OpenAI on :8000.

    python -m tests.harness.demo up | down | status
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.harness.hostinstall import install_units
from tests.harness.stack import REPO, SSW_VENV, http, make_tiny_model, wait_for
from tests.harness.sysbox import SysBox

CONFIG = REPO / "etc/ssw/demo/config.yaml"
MODELS = REPO / ".cache/demo-models"
PIDFILE = REPO / ".cache/demo.pid"
KEYFILE = REPO / ".cache/demo-key"
# A copy of the admin token, for the benchmarks that drive the admin API from outside.
ADMIN_TOKEN = REPO / ".cache/demo-admin-token"


def up() -> None:
    if PIDFILE.exists() and Path(f"/proc/{PIDFILE.read_text().strip()}").exists():
        sys.exit(f"the demo is already up (systemd PID {PIDFILE.read_text().strip()}); run 'down' first")
    print("demo: generating the tiny model")
    make_tiny_model(MODELS / "tiny-qwen")
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
    # The first API key, as a provisioned host gets one (only its digest is kept).
    added = box.run(str(SSW_VENV / "bin/ssw"), "-c", str(CONFIG), "keys", "add", "demo", "--operator", check=True)
    KEYFILE.write_text(added.stdout.strip() + "\n")
    KEYFILE.chmod(0o600)
    print("demo: ssw is up; waiting for the pinned model 'tiny' (real vLLM on the CPU, about a minute)")

    def tiny_ready() -> bool:
        try:
            status, _, body = http(
                "GET",
                "http://127.0.0.1:8000/v1/models",
                timeout=5,
                headers={"Authorization": "Bearer " + KEYFILE.read_text().strip()},
            )
        except OSError:
            return False
        return status == 200 and any(m["id"] == "tiny" and m["ssw"].get("state") == "ready" for m in body["data"])

    t0 = time.monotonic()
    wait_for(tiny_ready, 600, "the tiny model to load", interval=1)
    ADMIN_TOKEN.write_text(box.path("/var/lib/ssw/admin.token").read_text())
    ADMIN_TOKEN.chmod(0o600)
    print(f"demo: ready in {time.monotonic() - t0:.0f} s. OpenAI API on http://127.0.0.1:8000/v1")
    print(
        '  try:  curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer $(cat .cache/demo-key)" '
        "-H 'Content-Type: application/json' "
        '-d \'{"model": "light", "messages": [{"role": "user", "content": "hi"}]}\''
    )
    print("  page: http://localhost:8000/ui (the key in .cache/demo-key)")
    print(f"  host: nsenter -t {box.pid} -m -p systemctl status ssw-worker@tiny")
    print(f"        nsenter -t {box.pid} -m -p journalctl -u ssw-worker@tiny")
    print(f"  cli:  nsenter -t {box.pid} -m -p {SSW_VENV}/bin/ssw -c {CONFIG} status")
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
