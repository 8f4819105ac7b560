"""What both halves of a fleet agree on: the fleet's Redis (how to reach it, over
TLS checked against the fleet's CA) and its keys. Each loader publishes its host's
record (:mod:`ssw.loader.publish`) under ``ssw:fleet:host:<name>``; each gateway
reads them all (:mod:`ssw.gateway.fleet`). The record itself is
:class:`ssw.common.contract.HostRecord`.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from ssw.config import FleetSettings

PREFIX = "ssw:fleet:"
REDIS_TIMEOUT_S = 2.0
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
