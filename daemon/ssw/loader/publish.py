"""The loader's half of a fleet: this host's record (GPUs, models on disk, workers,
load times, where a load would fit), published every ``fleet.heartbeat_s`` with a
TTL of ``fleet.ttl_s``, so a host that dies drops out of everyone's routing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from ssw.common import tasks
from ssw.common.contract import HostRecord
from ssw.common.fleet_wire import LOG_EVERY_S, PREFIX, REDIS_TIMEOUT_S, fleet_redis, redacted
from ssw.config import FleetSettings

log = logging.getLogger(__name__)


class Publisher:
    """The loader's side: its host's record, every heartbeat."""

    def __init__(
        self,
        settings: FleetSettings,
        record: Callable[[], Awaitable[HostRecord]],
        in_group: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        # Whether this host runs a rank of a model across hosts: it then stays listed until
        # its TTL when its loader stops (a restart adopts the rank; the group lives on).
        self._in_group = in_group
        self.host = settings.host_name()
        self._record = record
        self._redis = fleet_redis(settings)
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self._warned = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await tasks.cancel(self._task)
        if self._in_group():
            await self._redis.aclose()
            return
        # Leaving on purpose: the others drop this host now, not after the TTL.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self._redis.delete(PREFIX + "host:" + self.host)
        await self._redis.aclose()

    async def publish(self) -> None:
        record = await self._record()
        ttl_ms = int(self.settings.ttl_s * 1000)
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(PREFIX + "host:" + self.host, record.model_dump_json(), px=ttl_ms)
        pipe.zadd(PREFIX + "hosts", {self.host: record.at})
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await pipe.execute()

    async def _run(self) -> None:
        while True:
            try:
                await self.publish()
                if not self.connected:
                    log.info("fleet: publishing host %s to %s", self.host, redacted(self.settings.redis_url))
                self.connected = True
            except (RedisError, OSError, TimeoutError) as exc:
                if self.connected or time.monotonic() - self._warned > LOG_EVERY_S:
                    self._warned = time.monotonic()
                    log.warning("fleet: cannot reach the fleet's Redis (%s); this host serves its own models", exc)
                self.connected = False
            except Exception:
                log.exception("fleet: publishing failed")
            await asyncio.sleep(self.settings.heartbeat_s)
