"""Which gateway process runs the batch tier: the one holding a lease in Redis,
renewed every tick. With several gateway processes exactly one runs it; when its
process dies, the next takes over within the lease's TTL, or at once when the
holder was a process of this host that is gone (a SIGKILLed gateway)."""

from __future__ import annotations

import logging
import os
import secrets
import socket

from ssw.batch.store import BatchStore

log = logging.getLogger(__name__)
LEASE_TTL_S = 10.0


class Lease:
    def __init__(self, store: BatchStore) -> None:
        self.store = store
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.holding = False

    async def hold(self) -> bool:
        """Take or renew the lease; whether this runner holds it now."""
        return await self.store.hold_lease(self.id, LEASE_TTL_S)

    async def release(self) -> None:
        if self.holding:
            await self.store.release_lease(self.id)

    async def holder_died(self) -> bool:
        """Free the lease of a runner on this host whose process is gone (a gateway
        SIGKILLed and restarted takes over at once, not after the lease's TTL)."""
        holder = await self.store.lease_holder()
        if holder is None:
            return False
        parts = holder.rsplit("-", 2)  # host-pid-nonce
        if len(parts) != 3 or not parts[1].isdigit() or parts[0] != socket.gethostname():
            return False
        pid = int(parts[1])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            pass
        except PermissionError:
            return False  # alive, as another account
        if await self.store.drop_lease(holder):
            log.info("batch runner: the previous runner (pid %d) is gone; taking over", pid)
            return True
        return False
