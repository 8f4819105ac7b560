"""Worker logs from journald, read with journalctl in a subprocess (never on the
event loop's thread). Only names of ssw's own worker units are accepted."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ssw.errors import BadRequest
from ssw.loader.systemd.units import parse_unit_name

MAX_LINES = 10_000


async def tail(unit: str, lines: int, directory: Path | None = None) -> list[str]:
    if parse_unit_name(unit) is None:
        raise BadRequest(f"not an ssw worker unit: {unit!r}")
    lines = max(1, min(lines, MAX_LINES))
    argv = ["journalctl", "--no-pager", "--quiet", "-o", "short-iso", "-n", str(lines), "-u", unit]
    if directory is not None:
        argv += ["--directory", str(directory)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=15)
    except (OSError, TimeoutError):
        return []
    return out.decode(errors="replace").splitlines()[-lines:]
