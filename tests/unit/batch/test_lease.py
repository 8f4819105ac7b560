"""Who runs the batch tier: a lease whose holder on this host is gone is taken over at
once; a live holder, or one on another host, is left to its TTL."""

from __future__ import annotations

import os
import socket
import subprocess

from ssw.batch.lease import Lease


class Store:
    """The lease's calls of the batch store, on a dict."""

    def __init__(self, holder: str | None) -> None:
        self.holder = holder
        self.dropped: list[str] = []

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        if self.holder in (None, holder):
            self.holder = holder
            return True
        return False

    async def lease_holder(self) -> str | None:
        return self.holder

    async def drop_lease(self, holder: str) -> bool:
        if self.holder != holder:
            return False
        self.dropped.append(holder)
        self.holder = None
        return True

    async def release_lease(self, holder: str) -> None:
        await self.drop_lease(holder)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_a_holder_of_this_host_that_is_gone_is_taken_over_at_once() -> None:
    gone = f"{socket.gethostname()}-{dead_pid()}-abcd"
    store = Store(gone)
    lease = Lease(store)  # type: ignore[arg-type]
    assert not await lease.hold()
    assert await lease.holder_died() and store.dropped == [gone]
    assert await lease.hold() and store.holder == lease.id


async def test_a_live_holder_or_another_hosts_keeps_the_lease() -> None:
    for holder in (f"{socket.gethostname()}-{os.getppid()}-abcd", f"elsewhere-{dead_pid()}-abcd", "garbled"):
        store = Store(holder)
        lease = Lease(store)  # type: ignore[arg-type]
        assert not await lease.hold()
        assert not await lease.holder_died() and store.dropped == [] and store.holder == holder


async def test_releasing_lets_go_only_of_a_lease_it_holds() -> None:
    store = Store(None)
    lease = Lease(store)  # type: ignore[arg-type]
    await lease.release()
    assert store.dropped == []
    assert await lease.hold()
    lease.holding = True
    await lease.release()
    assert store.dropped == [lease.id]
