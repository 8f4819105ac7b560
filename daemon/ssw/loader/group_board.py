"""The fleet's Redis as the loaders of a model across hosts use it: the group
records (:class:`ssw.common.contract.GroupRecord`, ``ssw:fleet:group:<model>``,
listed in ``ssw:fleet:groups``) and the other hosts' records.

A head writes its group's record and keeps it alive (a TTL of ``fleet.ttl_s``,
renewed every turn); members change it only to end it, and only the start it
was (compare-and-set on the group's id, in Redis, so a late member can never
end a newer start). Nothing read here is trusted for size or shape: a record
over ``MAX_RECORD_BYTES`` or off the contract is ignored, and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import ValidationError
from redis.exceptions import RedisError

from ssw.common.contract import GroupRecord, HostRecord
from ssw.common.fleet_wire import PREFIX, REDIS_TIMEOUT_S, fleet_redis, read_hosts
from ssw.config import FleetSettings

log = logging.getLogger(__name__)

GROUPS = PREFIX + "groups"
MAX_RECORD_BYTES = 64 * 1024

# Replace the record only while it is still the start ARGV[1] (its id); 1 if it was.
_IF_SAME_START = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or rec['id'] ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[2] == 'pexpire' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


class BoardUnavailable(Exception):
    """The fleet's Redis could not be read or written just now."""


def group_key(model: str) -> str:
    return PREFIX + "group:" + model


class GroupBoard:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.host = settings.host_name()
        self._redis = fleet_redis(settings)
        self._script = self._redis.register_script(_IF_SAME_START)

    @property
    def ttl_ms(self) -> int:
        return int(self.settings.ttl_s * 1000)

    async def close(self) -> None:
        await self._redis.aclose()

    async def groups(self) -> dict[str, GroupRecord]:
        """Every group's record, by model."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                models = sorted(str(m) for m in await self._redis.smembers(GROUPS))
                raw = await self._redis.mget([group_key(m) for m in models]) if models else []
                gone = [m for m, data in zip(models, raw, strict=True) if data is None]
                if gone:
                    await self._redis.srem(GROUPS, *gone)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(str(exc) or type(exc).__name__) from exc
        out = {}
        for model, data in zip(models, raw, strict=True):
            record = self._parse(model, data)
            if record is not None:
                out[model] = record
        return out

    async def get(self, model: str) -> GroupRecord | None:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                data = await self._redis.get(group_key(model))
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(str(exc) or type(exc).__name__) from exc
        return self._parse(model, data)

    @staticmethod
    def _parse(model: str, data: str | bytes | None) -> GroupRecord | None:
        if data is None:
            return None
        if len(data) > MAX_RECORD_BYTES:
            log.warning("fleet: ignoring the group record of %s: %d bytes", model, len(data))
            return None
        try:
            record = GroupRecord.model_validate_json(data)
        except ValidationError as exc:
            log.warning("fleet: ignoring the group record of %s: %s", model, exc)
            return None
        return record if record.model == model else None

    async def claim(self, record: GroupRecord) -> GroupRecord | None:
        """Write a new start's record unless another stands; the standing one otherwise."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                data = record.model_dump_json()
                if await self._redis.set(group_key(record.model), data, nx=True, px=self.ttl_ms):
                    await self._redis.sadd(GROUPS, record.model)
                    return None
                standing = await self._redis.get(group_key(record.model))
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(str(exc) or type(exc).__name__) from exc
        return self._parse(record.model, standing) or record

    async def take_over(self, stale: GroupRecord, record: GroupRecord) -> bool:
        """Replace a start this host headed before (a loader restart, a failed start) with a new one."""
        return await self._if_same(stale, record.model_dump_json(), str(self.ttl_ms))

    async def update(self, record: GroupRecord) -> bool:
        return await self._if_same(record, record.model_dump_json(), str(self.ttl_ms))

    async def renew(self, record: GroupRecord) -> bool:
        return await self._if_same(record, "pexpire", str(self.ttl_ms))

    async def end(self, record: GroupRecord, reason: str, unloaded: bool = False) -> bool:
        """Mark a start as ending, with why: every host stops its rank of it; ``unloaded``:
        on purpose (its head stops and does not load it again)."""
        if record.state == "ending":
            return True
        changes = {"state": "ending", "reason": reason[:2000], "unloaded": unloaded, "at": time.time()}
        ended = record.model_copy(update=changes)
        if not await self.update(ended):
            return False  # that start is over already
        log.warning("fleet: group %s of %s ends: %s", record.id, record.model, reason)
        return True

    async def delete(self, record: GroupRecord) -> bool:
        return await self._if_same(record, "", "0")

    async def _if_same(self, record: GroupRecord, value: str, ttl: str) -> bool:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                done = await self._script(keys=[group_key(record.model)], args=[record.id, value, ttl])
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(str(exc) or type(exc).__name__) from exc
        return bool(done)

    async def hosts(self) -> dict[str, HostRecord]:
        """The live hosts of the fleet (records within the TTL), this one included."""
        try:
            return await read_hosts(self._redis, self.settings.ttl_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(str(exc) or type(exc).__name__) from exc
