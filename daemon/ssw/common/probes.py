"""What the loader asks a worker, over its socket: whether it is healthy, how
many requests it has in flight (vLLM's own metrics), which routes it serves
(its OpenAPI document), whether it can still generate (a 1-token canary), and,
for the warm tier, to sleep, to wake and whether it sleeps."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ssw.common.upstream import Limits, Pool, ResponseFailed, UpstreamError
from ssw.common.upstream import fetch as _fetch

log = logging.getLogger(__name__)
# What a probe reads of a worker at the most: vLLM's /metrics and OpenAPI document
# are a few hundred kB. A worker sending more fails that probe.
PROBE_MAX_BYTES = 4 * 2**20


async def fetch(
    pool: Pool, socket: str, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    """One whole probe request; a worker's answer past a limit is logged once, with its socket."""
    try:
        return await _fetch(pool, socket, method, path, body, **headers)
    except ResponseFailed as exc:
        # The socket's directory is named after the worker's unit.
        log.warning("worker %s: %s %s: %s", Path(socket).parent.name, method, path, exc)
        raise


# vLLM's gauges of requests it holds: being generated, and queued.
WAITING_METRIC = "vllm:num_requests_waiting"
IN_FLIGHT_METRICS = ("vllm:num_requests_running", WAITING_METRIC)


# The known-answer check: a fixed prompt, a few greedy tokens (few: a slow engine pays them
# on every start and wake).
KNOWN_PROMPT = "The capital of France is"
KNOWN_TOKENS = 4


@dataclass(frozen=True)
class KnownAnswer:
    """A model's greedy answer to the fixed prompt."""

    text: str
    logprobs: tuple[float, ...] = ()  # per token, where the engine gives them

    def differs(self, other: KnownAnswer, tolerance: float) -> str | None:
        """Why ``other`` is not this answer (None: it is)."""
        if other.text != self.text:
            return f"{other.text!r} where {self.text!r} was recorded"
        for i, (was, now) in enumerate(zip(self.logprobs, other.logprobs, strict=False)):
            if abs(was - now) > tolerance:
                return f"token {i}'s logprob {now:.4f} where {was:.4f} was recorded (tolerance {tolerance})"
        return None


class Canary(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"  # the engine refused a completion: it does not generate (embeddings)


class Probes:
    def __init__(
        self,
        probe_timeout_s: float,
        canary_timeout_s: float,
        control_timeout_s: float = 60.0,
        max_bytes: int = PROBE_MAX_BYTES,
    ) -> None:
        limits = Limits(max_body_bytes=max_bytes)
        self._pool = Pool(probe_timeout_s, probe_timeout_s, limits)
        self._canary_pool = Pool(probe_timeout_s, canary_timeout_s, limits)
        # Sleep and wake answer once done: seconds for weights to move.
        self._control_pool = Pool(probe_timeout_s, control_timeout_s, limits)
        self._timeout = probe_timeout_s
        self._canary_timeout = canary_timeout_s

    async def close(self) -> None:
        await self._pool.close()
        await self._canary_pool.close()
        await self._control_pool.close()

    def forget(self, socket: Path) -> None:
        self._pool.forget(str(socket))
        self._canary_pool.forget(str(socket))
        self._control_pool.forget(str(socket))

    async def _control(self, socket: Path, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        """(status, body) of one control request; (0, why) when the worker did not answer."""
        try:
            async with asyncio.timeout(timeout):
                return await fetch(self._control_pool, str(socket), method, path)
        except TimeoutError:
            return 0, f"no answer within {timeout:.0f} s".encode()
        except UpstreamError as exc:
            return 0, str(exc).encode()

    async def sleep(self, socket: Path, level: int, timeout: float) -> str | None:
        """Put the engine to sleep (vLLM's POST /sleep?level=N); None when it did, else why not."""
        status, body = await self._control(socket, "POST", f"/sleep?level={level}", timeout)
        return None if status == 200 else _why("/sleep", status, body)

    async def wake(self, socket: Path, timeout: float) -> str | None:
        """Wake the engine (POST /wake_up); None when it did, else why not."""
        status, body = await self._control(socket, "POST", "/wake_up", timeout)
        return None if status == 200 else _why("/wake_up", status, body)

    async def load_adapter(self, socket: Path, name: str, path: Path, timeout: float) -> str | None:
        """Load a LoRA adapter into the worker under this name (vLLM's runtime LoRA API)."""
        body = json.dumps({"lora_name": name, "lora_path": str(path)}).encode()
        return await self._post_json(socket, "/v1/load_lora_adapter", body, timeout)

    async def unload_adapter(self, socket: Path, name: str, timeout: float) -> str | None:
        body = json.dumps({"lora_name": name}).encode()
        return await self._post_json(socket, "/v1/unload_lora_adapter", body, timeout)

    async def _post_json(self, socket: Path, path: str, body: bytes, timeout: float) -> str | None:
        try:
            async with asyncio.timeout(timeout):
                status, answer = await fetch(
                    self._control_pool, str(socket), "POST", path, body, Content_Type="application/json"
                )
        except TimeoutError:
            return f"{path}: no answer within {timeout:.0f} s"
        except UpstreamError as exc:
            return f"{path}: {exc}"
        return None if status == 200 else _why(path, status, answer)

    async def adapters(self, socket: Path) -> set[str] | None:
        """The LoRA adapters a worker has loaded: its /v1/models entries with a parent."""
        status, body = await self._control(socket, "GET", "/v1/models", self._timeout)
        if status != 200:
            return None
        try:
            data = json.loads(body).get("data", [])
        except (ValueError, AttributeError):
            return None
        return {m["id"] for m in data if isinstance(m, dict) and m.get("parent") and isinstance(m.get("id"), str)}

    async def is_sleeping(self, socket: Path) -> bool | None:
        """GET /is_sleeping; None when the worker cannot say (no sleep mode, or no answer)."""
        status, body = await self._control(socket, "GET", "/is_sleeping", self._timeout)
        if status != 200:
            return None
        try:
            value = json.loads(body).get("is_sleeping")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    async def healthy(self, socket: Path) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                status, _ = await fetch(self._pool, str(socket), "GET", "/health")
        except (UpstreamError, TimeoutError):
            return False
        return status == 200

    async def in_flight(self, socket: Path) -> int | None:
        """Requests the engine is generating or has queued; None when it cannot be asked."""
        return await self.gauges(socket, IN_FLIGHT_METRICS)

    async def waiting(self, socket: Path) -> int | None:
        """Requests queued in the engine, not yet generating; None when it cannot be asked."""
        return await self.gauges(socket, (WAITING_METRIC,))

    async def gauges(self, socket: Path, names: tuple[str, ...]) -> int | None:
        """The sum of these gauges of vLLM's /metrics; None when it cannot be asked."""
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await fetch(self._pool, str(socket), "GET", "/metrics")
        except (UpstreamError, TimeoutError):
            return None
        if status != 200:
            return None
        total = 0.0
        for family in text_string_to_metric_families(body.decode(errors="replace")):
            if family.name in names:
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

    async def known_answer(self, socket: Path, model: str) -> tuple[Canary, KnownAnswer | None, str]:
        """The engine's greedy answer to the fixed prompt, with its logprobs."""
        request = {
            "model": model,
            "prompt": KNOWN_PROMPT,
            "max_tokens": KNOWN_TOKENS,
            "temperature": 0,
            "logprobs": 1,
            "seed": 0,
        }
        try:
            async with asyncio.timeout(self._canary_timeout):
                status, answer = await fetch(
                    self._canary_pool,
                    str(socket),
                    "POST",
                    "/v1/completions",
                    json.dumps(request).encode(),
                    Content_Type="application/json",
                )
        except TimeoutError:
            return Canary.FAILED, None, f"no answer within {self._canary_timeout:.0f} s"
        except UpstreamError as exc:
            return Canary.FAILED, None, str(exc)
        if 400 <= status < 500:
            return Canary.NOT_APPLICABLE, None, f"completions answered {status}"
        if status != 200:
            return Canary.FAILED, None, f"a {KNOWN_TOKENS}-token completion answered {status}"
        parsed = _known(answer)
        if parsed is None:
            return Canary.FAILED, None, "a completion that is not one: " + answer[:200].decode(errors="replace")
        return Canary.PASSED, parsed, ""


def _known(answer: bytes) -> KnownAnswer | None:
    """The text and logprobs of a completion's first choice (None: not a completion)."""
    try:
        choice: Any = json.loads(answer)["choices"][0]
        text = choice["text"]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(text, str) or not all(isinstance(x, int | float) for x in logprobs):
        return None
    return KnownAnswer(text, tuple(float(x) for x in logprobs))


def _why(path: str, status: int, body: bytes) -> str:
    text = body[:200].decode(errors="replace")
    return f"{path}: {text}" if status == 0 else f"{path} answered {status}: {text}"
