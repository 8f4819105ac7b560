"""A local Hugging Face Hub for tests: huggingface_hub pointed at it (HF_ENDPOINT,
or endpoint=) lists and downloads the files of the model directories it serves,
so no test ever reaches a public hub.

It speaks the parts of the Hub's protocol that model_info and snapshot_download
use: GET /api/models/<repo>/revision/<rev> (with file sizes, git blob ids and
LFS sha256s), HEAD and GET /<repo>/resolve/<rev>/<file> with the commit, ETag
and size headers, and byte ranges (a resumed download asks for the rest).

Faults, per test: ``slow`` (bytes per second, so a download is still running
when a test interrupts it), ``corrupt`` (file names served with a byte changed,
their metadata unchanged), ``sizes`` (file names whose listed size is this, for
a disk-space refusal, or a listing that lies about what it sends), ``extra``
(sibling entries added to every listing as they are: names a lying hub gives).
``ranges`` records every Range header asked for. Ranges are answered as RFC 9110
says: a start at or past the end is a 416 with ``Content-Range: bytes */<size>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class FakeHub:
    repos: dict[str, Path]  # "owner/name" -> directory
    slow: int = 0  # bytes per second for file bodies; 0: as fast as possible
    corrupt: set[str] = field(default_factory=set)
    sizes: dict[str, int] = field(default_factory=dict)
    ranges: list[str] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _siblings(self, directory: Path) -> list[dict[str, Any]]:
        out = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            name = path.relative_to(directory).as_posix()
            data = path.read_bytes()
            size = self.sizes.get(name, len(data))
            entry: dict[str, Any] = {
                "rfilename": name,
                "size": size,
                "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            }
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
            out.append(entry)
        return out + list(self.extra)

    async def _info(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        if repo not in self.repos:
            return web.json_response({"error": "Repository not found"}, status=404)
        return web.json_response(
            {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": self._siblings(self.repos[repo])}
        )

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        name = request.match_info["path"]
        directory = self.repos.get(repo)
        path = directory / name if directory else None
        if path is None or not path.is_file() or ".." in Path(name).parts:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else hashlib.sha1(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(len(data))})
        self.gets.append(name)
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if (rng := request.headers.get("Range")) is not None:
            self.ranges.append(f"{name}: {rng}")
            start = int(rng.removeprefix("bytes=").split("-")[0] or 0)
            if start >= len(data):  # RFC 9110 15.5.17: nothing left to send
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        resp.content_length = len(body)
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await resp.prepare(request)
        step = max(self.slow // 10, 1) if self.slow else len(body) or 1
        for i in range(0, len(body), step):
            await resp.write(body[i : i + step])
            if self.slow:
                await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    def start(self) -> FakeHub:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", self._info)
            app.router.add_route("*", "/{owner}/{name}/resolve/{rev}/{path:.+}", self._resolve)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
            ready.set()
            loop.run_forever()
            loop.close()  # its self-pipe is a socket pair: never left to the garbage collector

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
