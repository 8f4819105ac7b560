"""The shipped units on a real systemd: ssw.target brings up the loader and the
gateway as Type=notify services (the gateway unprivileged and sandboxed), and
restarting either service leaves the workers running."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.hostinstall import UNITS, install_units
from tests.harness.stack import ADMIN_TOKENS, WORK_ROOT, free_port, http, wait_for, write_config
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd

CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def host(sysbox: SysBox, models_root: Path) -> Iterator[tuple[SysBox, str, str]]:
    public, admin = free_port(), free_port()
    directory = WORK_ROOT / f"host-units-{id(sysbox)}"
    config = write_config(
        directory,
        bus_address="unix:path=/run/dbus/system_bus_socket",
        journal_dir=None,
        models_dir=models_root,
        models={"alpha": {"path": "fake-a", "vram_gb": 4, "pinned": True}},
        engine="fake",
        public_port=public,
        admin_port=admin,
        extra={
            # The sandboxed loader may write only its StateDirectory and RuntimeDirectory.
            "state_dir": "/var/lib/ssw",
            # The gateway's own StateDirectory: uploaded files, batch results, async jobs.
            "batch": {"dir": "/var/lib/ssw/batches"},
            "workers": {"socket_dir": "/run/ssw/workers", "stop_timeout_s": 10, "drain_timeout_s": 10},
            "auth": {
                "enabled": False,
                "admin_token_file": "/var/lib/ssw/admin.token",
                "gateway_token_file": "/var/lib/ssw/gateway.token",
            },
            "gateway": {"metrics_listen": {"host": "127.0.0.1", "port": free_port()}},
        },
    )
    ADMIN_TOKENS[f"http://127.0.0.1:{admin}"] = sysbox.path("/var/lib/ssw/admin.token")
    directory.chmod(0o755)
    config.chmod(0o644)
    install_units(sysbox, config)
    yield sysbox, f"http://127.0.0.1:{public}", f"http://127.0.0.1:{admin}"
    sysbox.systemctl("stop", "ssw.target")


@pytest.fixture
def running(host: tuple[SysBox, str, str]) -> tuple[SysBox, str, str]:
    """ssw.target up and the pinned model ready, whatever the test before did."""
    box, _, admin = host
    started = box.systemctl("start", "ssw.target")
    assert started.returncode == 0, started.stderr
    wait_for(
        lambda: any(w["state"] == "ready" for w in http("GET", admin + "/status")[2]["workers"]), 60, "the pinned model"
    )
    return host


def show(box: SysBox, unit: str, *props: str) -> dict[str, str]:
    out = box.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_units_pass_systemd_analyze_verify(host: tuple[SysBox, str, str]) -> None:
    box, _, _ = host
    result = box.run("systemd-analyze", "verify", *(f"/etc/systemd/system/{u}" for u in UNITS))
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "ssw" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_target_starts_both_roles_as_notify_services(host: tuple[SysBox, str, str]) -> None:
    box, public, admin = host
    started = box.systemctl("start", "ssw.target")
    assert started.returncode == 0, started.stderr
    for unit in ("ssw-loader.service", "ssw-gateway.service"):
        props = show(box, unit, "ActiveState", "Type", "StatusText", "User", "NRestarts")
        assert props["ActiveState"] == "active", box.run("journalctl", "-u", unit, "--no-pager").stdout
        assert props["Type"] == "notify"
        # Sent with READY=1, then kept current.
        assert ("models ready" if unit == "ssw-loader.service" else "requests in flight") in props["StatusText"]
    assert show(box, "ssw-gateway.service", "User")["User"] == "ssw"
    gw_pid = show(box, "ssw-gateway.service", "MainPID")["MainPID"]
    assert box.run("ps", "-o", "user=", "-p", gw_pid).stdout.strip() == "ssw"
    # The pinned model loads at start; the gateway serves it.
    wait_for(
        lambda: any(w["state"] == "ready" for w in http("GET", admin + "/status")[2]["workers"]), 30, "the pinned model"
    )
    assert http("POST", public + "/v1/chat/completions", CHAT)[0] == 200


def test_restarting_the_services_keeps_the_worker(running: tuple[SysBox, str, str]) -> None:
    box, public, admin = running
    pid = show(box, "ssw-worker@alpha.service", "MainPID")["MainPID"]
    for unit in ("ssw-gateway.service", "ssw-loader.service"):
        assert box.systemctl("restart", unit).returncode == 0
    # Type=notify: restart returns once READY=1 came, i.e. after adoption.
    workers = http("GET", admin + "/status")[2]["workers"]
    assert [(w["unit"], w["adopted"], w["state"]) for w in workers] == [("ssw-worker@alpha.service", True, "ready")]
    wait_for(lambda: http("POST", public + "/v1/chat/completions", CHAT)[0] == 200, 30, "the gateway")
    assert show(box, "ssw-worker@alpha.service", "MainPID")["MainPID"] == pid


def test_journal_has_the_roles_logs(running: tuple[SysBox, str, str]) -> None:
    box, _, _ = running
    log = box.run("journalctl", "-u", "ssw-loader.service", "--no-pager", "-o", "cat").stdout
    # Whether this loader started the pinned worker or adopted it from the one before.
    assert "ssw-worker@alpha.service: starting (GPU" in log or "ssw-worker@alpha.service: adopted" in log, log


def test_a_wedged_gateway_is_restarted_by_the_watchdog(running: tuple[SysBox, str, str]) -> None:
    box, public, _ = running
    props = show(box, "ssw-gateway.service", "WatchdogUSec", "Restart")
    assert props["WatchdogUSec"] == "30s" and props["Restart"] == "on-failure"  # as shipped
    # A shorter watchdog for the test; then freeze the process, event loop and all.
    dropin = box.path("/etc/systemd/system/ssw-gateway.service.d/watchdog-test.conf")
    dropin.write_text("[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\n")
    box.systemctl("daemon-reload")
    try:
        assert box.systemctl("restart", "ssw-gateway.service").returncode == 0
        pid = show(box, "ssw-gateway.service", "MainPID")["MainPID"]
        time.sleep(3)  # pings keep a healthy gateway alive past its watchdog period
        assert show(box, "ssw-gateway.service", "MainPID")["MainPID"] == pid
        assert box.systemctl("kill", "--signal=STOP", "ssw-gateway.service").returncode == 0

        def restarted() -> bool:
            p = show(box, "ssw-gateway.service", "MainPID", "ActiveState")
            return p["ActiveState"] == "active" and p["MainPID"] not in (pid, "0")

        wait_for(restarted, 30, "systemd to restart the wedged gateway")
        wait_for(
            # systemd logs through kmsg in the disposable host, so its lines carry no unit field.
            lambda: "ssw-gateway.service: Watchdog timeout" in box.run("journalctl", "--no-pager", "-n", "300").stdout,
            10,
            "systemd's watchdog line in the journal",
        )
        assert int(show(box, "ssw-gateway.service", "NRestarts")["NRestarts"]) >= 1
        wait_for(lambda: http("GET", public + "/health")[0] == 200, 15, "the new gateway")
    finally:
        dropin.unlink()
        box.systemctl("daemon-reload")
        box.systemctl("restart", "ssw-gateway.service")


def test_another_local_account_cannot_use_the_admin_api(running: tuple[SysBox, str, str]) -> None:
    box, _, admin = running
    if box.run("id", "mallory").returncode != 0:
        box.run("useradd", "--no-create-home", "mallory", check=True)
    for account, path in (
        ("mallory", "/var/lib/ssw/admin.token"),
        ("mallory", "/var/lib/ssw/gateway.token"),
        ("ssw", "/var/lib/ssw/admin.token"),
    ):
        result = box.run("runuser", "-u", account, "--", "cat", path)
        assert result.returncode != 0 and "Permission denied" in result.stderr, (account, path)
    # The gateway's account reads its own credential, and only that.
    assert box.run("runuser", "-u", "ssw", "--", "cat", "/var/lib/ssw/gateway.token").returncode == 0
    for path in ("/status", "/load", "/unload"):
        method = "GET" if path == "/status" else "POST"
        code = box.run(
            "runuser",
            "-u",
            "mallory",
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"model": "alpha"}',
            admin + path,
        ).stdout
        assert code == "401", (path, code)
    assert any(w["model"] == "alpha" for w in http("GET", admin + "/status")[2]["workers"])


def test_no_other_account_can_reach_a_worker_by_socket_or_tcp(running: tuple[SysBox, str, str]) -> None:
    box, public, admin = running
    if box.run("id", "mallory").returncode != 0:
        box.run("useradd", "--no-create-home", "mallory", check=True)
    wait_for(
        lambda: any(w["state"] == "ready" for w in http("GET", admin + "/status")[2]["workers"]), 30, "the pinned model"
    )
    worker = next(w for w in http("GET", admin + "/status")[2]["workers"] if w["unit"] == "ssw-worker@alpha.service")
    sock = worker["socket"]
    body = '{"model": "alpha", "prompt": "hi", "max_tokens": 2}'

    def completion(account: str, *target: str) -> subprocess.CompletedProcess[str]:
        return box.run(
            "runuser", "-u", account, "--", "curl", "-sS", "-m", "5", "-H", "Content-Type: application/json",
            "-d", body, *target,
        )  # fmt: skip

    # The gateway's account reaches the socket; any other account is stopped at its directory.
    ok = completion("ssw", "--unix-socket", sock, "http://worker/v1/completions")
    assert ok.returncode == 0 and '"choices"' in ok.stdout, ok.stderr
    denied = completion("mallory", "--unix-socket", sock, "http://worker/v1/completions")
    assert denied.returncode != 0 and '"choices"' not in denied.stdout
    assert "Permission denied" in box.run("runuser", "-u", "mallory", "--", "ls", str(Path(sock).parent)).stderr
    # Workers run unprivileged, in a network namespace of their own: no TCP port of
    # theirs exists on the host, and none of the host's ports answers as a worker.
    pid = show(box, "ssw-worker@alpha.service", "MainPID")["MainPID"]
    assert box.run("ps", "-o", "user=", "-p", pid).stdout.strip() == "ssw-worker"
    assert box.run("readlink", f"/proc/{pid}/ns/net").stdout != box.run("readlink", "/proc/1/ns/net").stdout
    listeners = box.run("ss", "-H", "-ltnp").stdout
    assert f"pid={pid}," not in listeners
    ports = {line.split()[3].rsplit(":", 1)[1] for line in listeners.splitlines() if line.strip()}
    for port in sorted(ports - {public.rsplit(":", 1)[1], admin.rsplit(":", 1)[1]}):
        tried = completion("mallory", f"http://127.0.0.1:{port}/v1/completions")
        assert '"choices"' not in tried.stdout, (port, tried.stdout)
