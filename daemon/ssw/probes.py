"""What the loader asks a worker, over its socket: whether it is healthy, how
many requests it has in flight (vLLM's own metrics), which routes it serves
(its OpenAPI document), and whether it can still generate (a 1-token canary)."""

from __future__ import annotations

import asyncio
import enum
import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .upstream import Pool, UpstreamError, fetch

# vLLM's gauges of requests it holds: being generated, and queued.
IN_FLIGHT_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


class Canary(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"  # the engine refused a completion: it does not generate (embeddings)


class Probes:
    def __init__(self, probe_timeout_s: float, canary_timeout_s: float) -> None:
        self._pool = Pool(connect_timeout=probe_timeout_s, read_timeout=probe_timeout_s)
        self._canary_pool = Pool(connect_timeout=probe_timeout_s, read_timeout=canary_timeout_s)
        self._timeout = probe_timeout_s
        self._canary_timeout = canary_timeout_s

    async def close(self) -> None:
        await self._pool.close()
        await self._canary_pool.close()

    def forget(self, socket: Path) -> None:
        self._pool.forget(str(socket))
        self._canary_pool.forget(str(socket))

    async def healthy(self, socket: Path) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                status, _ = await fetch(self._pool, str(socket), "GET", "/health")
        except (UpstreamError, TimeoutError):
            return False
        return status == 200

    async def in_flight(self, socket: Path) -> int | None:
        """Requests the engine is generating or has queued; None when it cannot be asked."""
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await fetch(self._pool, str(socket), "GET", "/metrics")
        except (UpstreamError, TimeoutError):
            return None
        if status != 200:
            return None
        total = 0.0
        for family in text_string_to_metric_families(body.decode(errors="replace")):
            if family.name in IN_FLIGHT_METRICS:
                total += sum(sample.value for sample in family.samples)
        return int(total)

    async def routes(self, socket: Path) -> set[str] | None:
        """The paths the worker's API server mounted (its OpenAPI document); None when it
        cannot be asked."""
        try:
            # vLLM builds the document (a few hundred kB) on first asking: as slow as a canary.
            async with asyncio.timeout(self._canary_timeout):
                status, body = await fetch(self._canary_pool, str(socket), "GET", "/openapi.json")
            paths = json.loads(body).get("paths") if status == 200 else None
        except (UpstreamError, TimeoutError, ValueError, AttributeError):
            return None
        return set(paths) if isinstance(paths, dict) else None

    async def canary(self, socket: Path, model: str) -> tuple[Canary, str]:
        """One token through the engine: catches one that answers /health but cannot generate."""
        body = json.dumps({"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}).encode()
        try:
            async with asyncio.timeout(self._canary_timeout):
                status, answer = await fetch(
                    self._canary_pool, str(socket), "POST", "/v1/completions", body, Content_Type="application/json"
                )
        except TimeoutError:
            return Canary.FAILED, f"no token within {self._canary_timeout:.0f} s"
        except UpstreamError as exc:
            return Canary.FAILED, str(exc)
        if status == 200:
            return Canary.PASSED, ""
        if 400 <= status < 500:
            return Canary.NOT_APPLICABLE, f"completions answered {status}"
        return Canary.FAILED, f"a 1-token completion answered {status}: {answer[:200].decode(errors='replace')}"
