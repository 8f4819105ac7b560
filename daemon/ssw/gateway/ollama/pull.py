"""Ollama's /api/pull onto ssw's pull jobs. ssw pulls from a Hugging Face hub, not
from Ollama's registry, so the name is the one Ollama itself gives a hub model:
``hf.co/<owner>/<repo>[:revision]`` (``huggingface.co/`` too). The job is the
loader's (the same as ``ssw pull``); its progress streams as Ollama's objects:
``pulling manifest``, then ``downloading`` with ``total`` and ``completed``
bytes, then ``verifying``, ``writing manifest`` and ``success`` (or an error)."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from ssw.errors import BadRequest, LoaderUnavailable, SswError
from ssw.gateway.relay import Send

if TYPE_CHECKING:
    from ssw.gateway.handler import Gateway

HUB = re.compile(
    r"^(?:hf\.co|huggingface\.co)/([A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})(?::([A-Za-z0-9._-]{1,128}))?$"
)
POLL_S = 0.5
MAX_PULL_S = 24 * 3600


def hub_repo(name: str) -> tuple[str, str]:
    """(owner/repo, revision) from an Ollama name for a hub model; BadRequest otherwise."""
    m = HUB.match(name)
    if m is None:
        raise BadRequest(
            f"ssw pulls from a Hugging Face hub, not Ollama's registry: name the model hf.co/<owner>/<repo> "
            f"(got {name[:80]!r})"
        )
    revision = m.group(2) or "main"
    return m.group(1), "main" if revision == "latest" else revision


async def _loader(gw: Gateway, method: str, path: str, body: Any = None) -> dict[str, Any]:
    client = gw.loader
    try:
        async with client.session.request(
            method,
            client.url + path,
            json=body,
            headers=client.auth_headers(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise LoaderUnavailable(f"the loader cannot be reached for a pull: {exc}") from exc
    if resp.status >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        failure = SswError(str(err.get("message", f"the loader answered {resp.status}")))
        failure.status = resp.status
        raise failure
    return data if isinstance(data, dict) else {}


async def run(gw: Gateway, send: Send, body: dict[str, Any]) -> None:
    repo, revision = hub_repo(str(body.get("model", "")))
    stream = body.get("stream", True)
    job = await _loader(gw, "POST", "/pull", {"repo": repo, "revision": revision})
    lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    if stream:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]}
        )
        await _lines(send, lines)
        lines = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_PULL_S
    last = None
    while loop.time() < deadline:
        job = await _loader(gw, "GET", f"/jobs/{job['id']}")
        progress = (job.get("bytes_total", 0), job.get("bytes_done", 0))
        if job.get("status") == "running" and progress != last and stream:
            last = progress
            await _lines(
                send,
                [
                    {
                        "status": f"pulling {repo}",
                        "digest": f"{repo}@{revision}",
                        "total": progress[0],
                        "completed": progress[1],
                    }
                ],
            )
        if job.get("status") in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(POLL_S)
    if job.get("status") == "succeeded":
        done = [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        total = job.get("bytes_total", 0)
        if stream and (total, job.get("bytes_done", 0)) != last:
            # The whole of it, as Ollama ends a layer (a quick pull may never have been seen running).
            done.insert(
                0,
                {
                    "status": f"pulling {repo}",
                    "digest": f"{repo}@{revision}",
                    "total": total,
                    "completed": job.get("bytes_done", total),
                },
            )
        if not stream:
            await _whole(send, 200, {"status": "success"})
            return
        await _lines(send, done, last=True)
        return
    why = job.get("error") or f"the pull ended {job.get('status', 'unfinished')}"
    if not stream:
        await _whole(send, 500, {"error": why})
        return
    await _lines(send, [{"error": why}], last=True)


async def _lines(send: Send, objs: list[dict[str, Any]], last: bool = False) -> None:
    await send(
        {"type": "http.response.body", "body": b"".join(orjson.dumps(o) + b"\n" for o in objs), "more_body": not last}
    )


async def _whole(send: Send, status: int, obj: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": orjson.dumps(obj), "more_body": False})
