"""An Ansible connection into a disposable systemd host (tests/harness/sysbox.py):
commands run through nsenter in its mount and PID namespaces, as SSH would
run them on a real host, so that one controller converges several hosts."""

from __future__ import annotations

import shlex
import subprocess
from typing import Any

from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: sysbox
short_description: run on a disposable systemd host (nsenter)
description: Runs commands in the mount and PID namespaces of a test host's systemd.
author: ssw
options:
  sysbox_pid:
    description: The PID of the host's systemd, as seen from the controller.
    vars:
      - name: sysbox_pid
  remote_user:
    description: Who commands run as; root, as nsenter runs them (so become is not needed).
    default: root
    vars:
      - name: ansible_user
"""


class Connection(ConnectionBase):  # type: ignore[misc]
    transport = "sysbox"
    has_pipelining = True

    def _prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.get_option("sysbox_pid")), "-m", "-p", "--"]

    def _connect(self) -> Connection:
        self._connected = True
        return self

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        done = subprocess.run([*self._prefix(), "/bin/sh", "-c", cmd], input=in_data, capture_output=True)
        return done.returncode, done.stdout, done.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as source:
            subprocess.run(
                [*self._prefix(), "/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"], stdin=source, check=True
            )

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as target:
            subprocess.run([*self._prefix(), "cat", in_path], stdout=target, check=True)

    def close(self, *args: Any) -> None:
        self._connected = False
