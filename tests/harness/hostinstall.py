"""Install ssw's units into a disposable systemd host the way a provisioned
host has them, with a drop-in that points them at this checkout."""

from __future__ import annotations

import shutil
from pathlib import Path

from ssw.config import load_config
from tests.harness.stack import REPO, SSW_VENV
from tests.harness.sysbox import SysBox

UNITS = ("ssw.target", "ssw-gateway.service", "ssw-loader.service", "ssw-workers.slice")


def install_units(box: SysBox, config: Path) -> None:
    if box.run("id", "ssw").returncode != 0:
        box.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "ssw", check=True)
    # This machine's Python (pyenv) lives under /root; inside the disposable
    # host only, let the gateway's unprivileged account reach it.
    box.run("chmod", "755", "/root", check=True)
    unit_dir = box.path("/etc/systemd/system")
    models_dir = load_config(config).models_dir
    for name in UNITS:
        shutil.copy(REPO / "units" / name, unit_dir / name)
    # A checkout under /tmp (as CI may clone it) would be hidden by PrivateTmp.
    in_tmp = any(REPO.is_relative_to(p) or config.is_relative_to(p) for p in (Path("/tmp"), Path("/var/tmp")))
    for role in ("gateway", "loader"):
        dropin = unit_dir / f"ssw-{role}.service.d"
        dropin.mkdir(exist_ok=True)
        (dropin / "checkout.conf").write_text(
            "# Run from this checkout instead of /opt/ssw/venv.\n"
            "[Service]\n"
            f"Environment=SSW_CONFIG={config}\n"
            "ExecStart=\n"
            f"ExecStart={SSW_VENV}/bin/ssw {role}\n"
            "# The checkout's Python is under /root (pyenv).\n"
            "ProtectHome=read-only\n"
            + ("PrivateTmp=no\n" if in_tmp else "")
            # Pulls write into the models dir, as the Ansible role's drop-in allows.
            + (f"ReadWritePaths=-{models_dir}\n" if role == "loader" else "")
        )
    box.systemctl("daemon-reload")
