"""What both halves of a fleet agree on: the fleet's Redis (how to reach it, over
TLS checked against the fleet's CA) and its keys. Each loader publishes its host's
record (:mod:`ssw.loader.publish`) under ``ssw:fleet:host:<name>``; each gateway
reads them all (:mod:`ssw.gateway.fleet`). The record itself is
:class:`ssw.common.contract.HostRecord`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from ssw.common.contract import HostRecord
from ssw.config import FleetSettings

log = logging.getLogger(__name__)

PREFIX = "ssw:fleet:"
REDIS_TIMEOUT_S = 2.0
MAX_HOST_RECORD_BYTES = 4 * 1024 * 1024  # what one host's record may be
LOG_EVERY_S = 30.0


def fleet_redis(settings: FleetSettings, timeout: float = REDIS_TIMEOUT_S) -> aioredis.Redis:
    """The fleet's Redis; over TLS (rediss://) checked against the fleet's CA, with this
    host's certificate for a server that asks for one."""
    assert settings.redis_url
    tls: dict[str, Any] = {}
    if settings.redis_url.startswith("rediss://"):
        tls = {
            "ssl_ca_certs": str(settings.tls_ca_file) if settings.tls_ca_file else None,
            "ssl_certfile": str(settings.tls_cert_file) if settings.tls_cert_file else None,
            "ssl_keyfile": str(settings.tls_key_file) if settings.tls_key_file else None,
        }
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        decode_responses=True,
        **tls,
    )


def redacted(url: str | None) -> str:
    """A Redis URL without its password, for logs."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


async def read_hosts(redis: aioredis.Redis, ttl_s: float) -> dict[str, HostRecord]:
    """Every host heard from within ``ttl_s``, by name: its record, checked for size, shape
    (this contract's version), name and age; a record that fails is left out and logged.
    Raises what Redis raises (RedisError, OSError, TimeoutError)."""
    now = time.time()
    async with asyncio.timeout(REDIS_TIMEOUT_S):
        found = await redis.zrangebyscore(PREFIX + "hosts", now - ttl_s, "+inf")
        names = [str(n) for n in found]
        raw = await redis.mget([PREFIX + "host:" + n for n in names]) if names else []
    hosts: dict[str, HostRecord] = {}
    for name, data in zip(names, raw, strict=True):
        if data is None:
            continue  # expired: the host is gone
        if len(data) > MAX_HOST_RECORD_BYTES:
            log.warning("fleet: ignoring host %s: its record is %d bytes", name, len(data))
            continue
        try:
            record = HostRecord.model_validate_json(data)
        except ValidationError as exc:
            log.warning("fleet: ignoring host %s: its record does not match this version: %s", name, exc)
            continue
        if record.host == name and record.at + ttl_s > now:
            hosts[name] = record
    return hosts
