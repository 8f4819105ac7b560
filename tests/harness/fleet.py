"""A test fleet on this one machine: each host a disposable systemd host with its
own network namespace (a veth pair to a bridge, its own address, the
production ports: the gateway on :8000 and its fleet listener on :8443, the
loader on 127.0.0.1:8001), its own loader and gateway, and one Redis for the
fleet on the bridge, over TLS. The fleet's CA and every certificate are made
here with openssl, as the Ansible role makes them on its controller.

    net = Network().up()
    pki = Pki(root / "pki")
    a = FleetHost.start(net, 1, ..., pki=pki)   # <subnet>.2
    b = FleetHost.start(net, 2, ..., pki=pki)   # <subnet>.3
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.stack import WORK_ROOT, RedisServer, Role, http, wait_for, write_config
from tests.harness.sysbox import SysBox


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    """A bridge in this namespace and one network namespace per host. Names and
    subnet are this process's own, so that two test runs on one machine (CI and
    a developer's) never share a fleet."""

    def __init__(self) -> None:
        self.tag = os.getpid() % 10000
        self.bridge = f"sswb{self.tag}"
        self.subnet = f"10.{77 + self.tag // 250 % 100}.{self.tag % 250}"
        self.gateway_ip = f"{self.subnet}.1"  # the bridge: where the fleet's Redis listens
        self.namespaces: list[str] = []

    def _veth(self, index: int, end: str) -> str:
        return f"v{self.tag}x{index}{end}"  # at most 15 characters

    def up(self) -> Network:
        self.down()  # what a crashed run of this PID left behind
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def add(self, index: int) -> tuple[str, str]:
        """(namespace, address) of host ``index`` (1, 2, ...)."""
        ns, address = f"sswf{self.tag}-{index}", f"{self.subnet}.{index + 1}"
        host_end, ns_end = self._veth(index, "h"), self._veth(index, "n")
        ip("netns", "del", ns, check=False)
        ip("link", "del", host_end, check=False)
        ip("netns", "add", ns)
        ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        ip("link", "set", ns_end, "netns", ns)
        ip("link", "set", host_end, "master", self.bridge)
        ip("link", "set", host_end, "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", ns_end)
        ip("-n", ns, "link", "set", ns_end, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        self.namespaces.append(ns)
        return ns, address

    def link(self, index: int) -> str:
        """The bridge's end of host ``index``'s link: all its traffic passes there."""
        return self._veth(index, "h")

    def cut(self, index: int) -> None:
        """Take host ``index`` off the network (a partition)."""
        ip("link", "set", self._veth(index, "h"), "down")

    def restore(self, index: int) -> None:
        ip("link", "set", self._veth(index, "h"), "up")

    def down(self) -> None:
        for ns in self.namespaces:
            ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        ip("link", "del", self.bridge, check=False)


FLEET_PORT = 8443


class Pki:
    """The fleet's CA, and certificates it signs for an address (EC P-256, a day long)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = directory / "ca.pem"
        self.ca_key = directory / "ca.key"
        if not self.ca.exists():
            self._openssl(
                "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-keyout", str(self.ca_key), "-out", str(self.ca), "-days", "1", "-subj", "/CN=ssw test fleet CA",
            )  # fmt: skip

    @staticmethod
    def _openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    def issue(self, name: str, address: str) -> tuple[Path, Path]:
        """(certificate, key) for ``name`` at ``address`` (its SAN)."""
        cert, key, csr = self.dir / f"{name}.pem", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        if not cert.exists():
            self._openssl(
                "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
            )  # fmt: skip
            ext = self.dir / f"{name}.ext"
            ext.write_text(f"subjectAltName=IP:{address},DNS:{name}\nextendedKeyUsage=serverAuth,clientAuth\n")
            self._openssl(
                "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
                "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext),
            )  # fmt: skip
            key.chmod(0o644)  # the test's processes run as root, and the gateway's account reads it
        return cert, key


def fleet_redis_server(root: Path, net: Network, pki: Pki | None) -> RedisServer:
    """The fleet's Redis on the bridge, with a password; over TLS with ``pki``'s
    certificate for the bridge's address."""
    tls = (pki.ca, *pki.issue("redis", net.gateway_ip)) if pki is not None else None
    return RedisServer(root / "redis", host=net.gateway_ip, password=secrets.token_hex(8), tls=tls).start()


def fleet_secret(root: Path) -> Path:
    """A new fleet secret in a file, as the Ansible role makes one."""
    path = root / "fleet.token"
    path.write_text(secrets.token_urlsafe(32))
    return path


@dataclass
class FleetHost:
    name: str
    netns: str
    address: str
    box: SysBox
    dir: Path
    config: Path
    loader: Role
    gateway: Role

    @property
    def public(self) -> str:
        return f"http://{self.address}:8000"

    @classmethod
    def start(
        cls,
        net: Network,
        index: int,
        root: Path,
        models_dir: Path,
        models: dict[str, Any],
        fleet: dict[str, Any],
        extra: dict[str, Any] | None = None,
        pki: Pki | None = None,
        engine: str = "fake",
    ) -> FleetHost:
        netns, address = net.add(index)
        name = f"host{chr(ord('a') + index - 1)}"
        if pki is not None:
            cert, key = pki.issue(name, address)
            tls: dict[str, Any] = {
                "advertise_url": f"https://{address}:{FLEET_PORT}",
                "tls_ca_file": str(pki.ca),
                "tls_cert_file": str(cert),
                "tls_key_file": str(key),
            }
        else:
            tls = {"advertise_url": f"http://{address}:{FLEET_PORT}", "insecure": True}
        directory = root / name
        box = SysBox.boot(share=(WORK_ROOT,), netns=netns)
        config = write_config(
            directory,
            bus_address=box.bus_address,
            journal_dir=box.journal_dir,
            models_dir=models_dir,
            models=models,
            engine=engine,
            public_port=8000,
            admin_port=8001,
            extra={
                "public": {"host": "0.0.0.0", "port": 8000},
                "gateway": {"metrics_listen": {"host": "127.0.0.1", "port": 8002}},
                "fleet": {
                    **fleet,
                    **tls,
                    "host": name,
                    "listen": {"host": address, "port": FLEET_PORT},
                },
                **(extra or {}),
                # The hosts share this machine's cgroup tree: each gets a slice of its
                # own, or a unit of the same name on two hosts (a model loaded on both,
                # or a model across both) would be one cgroup, with one IP filter. New
                # per start: a cgroup a killed host left behind keeps its BPF filters.
                "workers": {"slice": f"ssw-{name}{secrets.token_hex(3)}.slice", **(extra or {}).get("workers", {})},
            },
        )
        host = cls(
            name,
            netns,
            address,
            box,
            directory,
            config,
            Role("loader", config, directory, netns),
            Role("gateway", config, directory, netns),
        )
        host.start_roles()
        return host

    def start_roles(self) -> None:
        self.loader.start()
        wait_for(lambda: self.admin("GET", "/health")[0] == 200, 30, f"{self.name}'s loader")
        self.gateway.start()
        wait_for(lambda: self.health().get("loader_connected"), 30, f"{self.name}'s gateway")

    def health(self) -> dict[str, Any]:
        try:
            status, _, body = http("GET", self.public + "/health", timeout=3)
        except OSError:
            return {}
        return body if status == 200 and isinstance(body, dict) else {}

    def admin(self, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
        """The loader's admin API, from inside the host's namespace (it listens on its loopback)."""
        token_file = self.dir / "admin.token"
        cmd = ["ip", "netns", "exec", self.netns, "curl", "-s", "-m", str(timeout), "-X", method]
        cmd += ["-w", "\n%{http_code}", f"http://127.0.0.1:8001{path}"]
        if token_file.exists():
            cmd += ["-H", f"Authorization: Bearer {token_file.read_text().strip()}"]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10).stdout
        text, _, code = out.rpartition("\n")
        try:
            return int(code or 0), json.loads(text) if text else None
        except ValueError:
            return int(code or 0), text

    def metrics(self) -> str:
        """The gateway's Prometheus text (it listens on the host's loopback)."""
        cmd = ["ip", "netns", "exec", self.netns, "curl", "-s", "-m", "10", "http://127.0.0.1:8002/metrics"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout

    def workers(self, model: str | None = None) -> list[dict[str, Any]]:
        status, body = self.admin("GET", "/status")
        assert status == 200, body
        return [w for w in body["workers"] if model is None or w["model"] == model]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        from tests.harness.stack import REPO, SSW_VENV

        return subprocess.run(
            ["ip", "netns", "exec", self.netns, str(SSW_VENV / "bin/ssw"), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )

    def kill(self) -> None:
        """The host dies: its systemd (and every worker), its loader and its gateway."""
        for role in (self.gateway, self.loader):
            if role.proc is not None and role.proc.poll() is None:
                role.kill()
        self.box.stop()

    def revive(self) -> None:
        """Boot the host again after kill(): a fresh systemd, its loader and gateway."""
        self.box = SysBox.boot(share=(WORK_ROOT,), netns=self.netns)
        # The new systemd's bus and journal, where the config named the old one's.
        self.config.write_text(re.sub(r"/proc/\d+/root", str(self.box.root), self.config.read_text()))
        self.start_roles()

    def stop(self) -> None:
        self.gateway.stop()
        self.loader.stop()
        self.box.stop()
        self.remove_cgroups()

    def remove_cgroups(self) -> None:
        """The cgroups its workers' slice left in this machine's tree (a stopped host's
        systemd does not remove them)."""
        import yaml

        workers = yaml.safe_load(self.config.read_text()).get("workers", {})
        slice_name = str(workers.get("slice", ""))
        if not slice_name.startswith("ssw-"):
            return
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            top = hierarchy / "ssw.slice" / slice_name
            if top.is_dir():
                for directory in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                    if directory.is_dir():
                        with contextlib.suppress(OSError):
                            directory.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()


def fleet_hosts(host: FleetHost) -> list[str]:
    """The hosts ``host``'s gateway follows (none while it cannot reach the fleet's Redis)."""
    fleet = host.health().get("fleet") or {}
    return list(fleet.get("hosts", [])) if fleet.get("connected") else []


@dataclass
class TwoHosts:
    net: Network
    redis: RedisServer
    a: FleetHost
    b: FleetHost

    @property
    def hosts(self) -> tuple[FleetHost, FleetHost]:
        return self.a, self.b


@contextlib.contextmanager
def two_hosts(
    name: str,
    models_dir: Path,
    models: dict[str, Any],
    fleet: dict[str, Any],
    extra: dict[str, Any] | None = None,
    engine: str = "fake",
) -> Iterator[TwoHosts]:
    """Two hosts of one fleet (the same models on both) over TLS, on a fleet Redis of their
    own, once each follows the other; ``fleet`` adds to the fleet section. Taken down after."""
    root = WORK_ROOT / f"{name}-{secrets.token_hex(3)}"
    root.mkdir(parents=True)
    net = Network().up()
    pki = Pki(root / "pki")
    redis = fleet_redis_server(root, net, pki)
    settings = {"redis_url": redis.url, "credential_file": str(fleet_secret(root)), **fleet}
    hosts: list[FleetHost] = []
    try:
        for index in (1, 2):
            hosts.append(FleetHost.start(net, index, root, models_dir, models, settings, extra, pki, engine))
        wait_for(lambda: all(len(fleet_hosts(h)) == 2 for h in hosts), 30, "both hosts to see each other")
        yield TwoHosts(net, redis, hosts[0], hosts[1])
    finally:
        for host in hosts:
            host.stop()
        redis.stop()
        net.down()
