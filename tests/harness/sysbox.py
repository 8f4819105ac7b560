"""A disposable systemd host: systemd as PID 1 of a new PID + mount namespace,
on an in-memory overlay of /, so units, journald and D-Bus are real while
nothing written inside reaches the machine (systemd-tmpfiles would otherwise
wipe the real /tmp; inside, tmpfiles is told to leave /tmp alone, so a
checkout under /tmp is visible). The network namespace is shared: a worker's port inside
is reachable from outside.

    python -m tests.harness.sysbox boot     # prints the PID, keeps running
    python -m tests.harness.sysbox stop PID
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INIT = Path(__file__).with_name("sysbox-init.sh")


class SysBox:
    def __init__(self, pid: int, base: Path, launcher: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.base = base
        self._launcher = launcher

    @classmethod
    def boot(
        cls, timeout: float = 180.0, tmpfs_size: str = "6g", share: tuple[Path, ...] = (), netns: str | None = None
    ) -> SysBox:
        """Boot one; with ``netns``, in that network namespace (a host of a test fleet)."""
        if os.geteuid() != 0:
            raise RuntimeError("booting a disposable systemd host needs root (namespaces, mounts)")
        base = Path(tempfile.mkdtemp(prefix="ssw-sysbox-"))
        prefix = ["ip", "netns", "exec", netns] if netns else []
        launcher = subprocess.Popen(
            [*prefix, "unshare", "--pid", "--fork", "--mount", "--mount-proc", str(INIT), str(base)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "SYSBOX_TMPFS_SIZE": tmpfs_size, "SYSBOX_SHARE": " ".join(str(p) for p in share)},
        )
        deadline = time.monotonic() + timeout
        pid = None
        while time.monotonic() < deadline:
            if launcher.poll() is not None:
                err = launcher.stderr.read().decode() if launcher.stderr else ""
                raise RuntimeError(f"sysbox failed to boot: {err.strip()}")
            children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
            kids = children.read_text().split() if children.exists() else []
            if kids:
                pid = int(kids[0])
                break
            time.sleep(0.05)
        if pid is None:
            launcher.kill()
            raise RuntimeError("sysbox: systemd did not start")
        box = cls(pid, base, launcher)
        try:
            box.wait_running(deadline)
        except BaseException:
            box.stop()  # never leave a half-booted host behind
            raise
        return box

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.pid}/root")

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.root}/run/dbus/system_bus_socket"

    @property
    def journal_dir(self) -> Path:
        return self.root / "var/log/journal"

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "--", *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args)

    def wait_running(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            if Path(f"{self.root}/run/dbus/system_bus_socket").exists():
                state = self.systemctl("is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"sysbox: systemd not running in time (state {state!r})")

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()

    def stop(self) -> None:
        if self.alive():
            # SIGKILL of a PID namespace's init takes every process inside with it.
            os.kill(self.pid, signal.SIGKILL)
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
                # Reaped here, or a still running Popen is collected during a later test.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._launcher.wait(timeout=30)
            if self._launcher.stderr is not None:
                self._launcher.stderr.close()
        deadline = time.monotonic() + 30
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.base, ignore_errors=True)


def main() -> None:
    if sys.argv[1:2] == ["boot"]:
        box = SysBox.boot()
        print(box.pid)
    elif sys.argv[1:2] == ["stop"] and len(sys.argv) == 3:
        SysBox(int(sys.argv[2]), Path("/nonexistent")).stop()
    else:
        sys.exit("usage: sysbox.py boot | stop PID")


if __name__ == "__main__":
    main()
