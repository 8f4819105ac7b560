"""Each worker's socket directory: its own, under ``workers.socket_dir``, that its
account may create the socket in and only the gateway's group may connect
through; removed with the worker, and stale ones removed at start."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
from pathlib import Path

from ssw.config import Config
from ssw.errors import ConfigError
from ssw.loader.systemd.units import socket_dir_name, socket_path
from ssw.loader.workers.parts import Piece


def _accounts(cfg: Config) -> tuple[int, int]:
    """(uid of the workers' account, gid of the gateway's group): the owners of socket directories."""
    try:
        user = pwd.getpwnam(cfg.workers.user)
    except KeyError:
        raise ConfigError(f"workers.user: no account named {cfg.workers.user!r} on this host") from None
    if user.pw_uid == 0:
        raise ConfigError(f"workers.user: {cfg.workers.user!r} is root; workers never run as root")
    try:
        group = grp.getgrnam(cfg.auth.gateway_group)
    except KeyError:
        raise ConfigError(
            f"auth.gateway_group: no group named {cfg.auth.gateway_group!r} on this host "
            "(the gateway reaches the workers' sockets through it)"
        ) from None
    return user.pw_uid, group.gr_gid


class Sockets(Piece):
    _uid, _gid = -1, -1

    async def prepare(self) -> None:
        """Look up the accounts that own socket directories and make the root."""
        self._uid, self._gid = await asyncio.to_thread(_accounts, self.cfg)
        await asyncio.to_thread(self._prepare_root)

    def _prepare_root(self) -> None:
        root = self.cfg.workers.socket_dir
        root.mkdir(parents=True, exist_ok=True)
        # Workers may pass through (to their own directory); nobody may list it.
        os.chmod(root, 0o711)

    def make_dir(self, unit: str) -> Path:
        """A fresh directory for the worker's socket: its account may create the socket,
        the gateway's group may connect (setgid: the socket gets that group), nobody else
        may even look."""
        path = socket_path(self.cfg.workers.socket_dir, unit)
        _remove_dir(path.parent)  # a stale one from a dead worker
        path.parent.mkdir(mode=0o700)
        os.chmod(path.parent, 0o2750)  # before chown: chmod needs ownership
        os.chown(path.parent, self._uid, self._gid)
        return path

    def remove_dir(self, socket: Path) -> None:
        if socket.parent.parent == self.cfg.workers.socket_dir:
            _remove_dir(socket.parent)

    def remove_stale(self) -> None:
        keep = {socket_dir_name(w.unit) for w in self.table}
        with contextlib.suppress(OSError):
            for entry in self.cfg.workers.socket_dir.iterdir():
                if entry.is_dir() and entry.name not in keep:
                    _remove_dir(entry)


def _remove_dir(path: Path) -> None:
    """Remove a worker's socket directory. The loader has no CAP_DAC_OVERRIDE, so it
    takes the directory back (CAP_CHOWN) to be allowed to empty it."""
    with contextlib.suppress(FileNotFoundError):
        os.chown(path, 0, 0)
    shutil.rmtree(path, ignore_errors=True)
