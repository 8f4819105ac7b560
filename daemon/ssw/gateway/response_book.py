"""Which worker holds each stored Response.

vLLM keeps a Response it created (``store``) in that worker's memory: a
retrieve, a cancel, or a new response that continues it
(``previous_response_id``) must reach that same worker, and nothing else may
answer it. The gateway notes the holder of each response id it relays, with
the API key that created it, in a bounded in-memory LRU and in Redis (with
an expiry) so that every gateway process and a restarted gateway find it. A
Redis that is down costs the cross-process lookups, never a request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 0.5
LOG_EVERY_S = 30.0


@dataclass(frozen=True, slots=True)
class Holder:
    model: str
    unit: str  # the worker's unit
    key: str  # the API key's name that created it ("" with auth off)
    host: str = ""  # the fleet host whose worker holds it ("": no fleet)


class ResponseBook:
    def __init__(self, redis: aioredis.Redis | None, remember_s: float, max_entries: int, prefix: str = "ssw:") -> None:
        self.remember_s = remember_s
        self.max_entries = max_entries
        self.prefix = prefix + "response:"
        self._local: collections.OrderedDict[str, tuple[float, Holder]] = collections.OrderedDict()
        self._redis = redis
        self._last_log = 0.0

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def remember(self, response_id: str, holder: Holder) -> bool:
        """Note who holds a response; False (and nothing changed) when the id is already
        noted for another key: an entry is never taken over."""
        known = self._local.get(response_id)
        if known is not None and known[0] > time.monotonic() and known[1].key != holder.key:
            log.warning("response %s: already held for another key; not noted again", response_id)
            return False
        self._local[response_id] = (time.monotonic() + self.remember_s, holder)
        self._local.move_to_end(response_id)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)
        if self._redis is None:
            return True
        value = orjson.dumps([holder.model, holder.unit, holder.key, holder.host])
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                # NX: another gateway process (or host) may have noted it for another key.
                if not await self._redis.set(
                    self.prefix + response_id, value, ex=max(1, int(self.remember_s)), nx=True
                ):
                    raw = await self._redis.get(self.prefix + response_id)
                    if raw is not None and orjson.loads(raw)[2:3] != [holder.key]:
                        del self._local[response_id]
                        log.warning("response %s: already held for another key; not noted again", response_id)
                        return False
        except (RedisError, OSError, TimeoutError) as exc:
            self._warn(f"cannot note response {response_id} in Redis ({exc}); only this process knows its worker")
        return True

    async def find(self, response_id: str) -> Holder | None:
        found = self._local.get(response_id)
        if found is not None:
            if found[0] > time.monotonic():
                self._local.move_to_end(response_id)
                return found[1]
            del self._local[response_id]
        if self._redis is None:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                raw = await self._redis.get(self.prefix + response_id)
        except (RedisError, OSError, TimeoutError) as exc:
            self._warn(f"cannot look up response {response_id} in Redis ({exc})")
            return None
        if raw is None:
            return None
        try:
            model, unit, key, *host = orjson.loads(raw)
            return Holder(str(model), str(unit), str(key), str(host[0]) if host else "")
        except (ValueError, TypeError):
            return None

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("%s", message)
