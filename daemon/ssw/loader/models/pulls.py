"""Pulls: models downloaded from a Hugging Face hub as background jobs.

A pull lists the repository's files at a pinned revision (the hub's commit,
through huggingface_hub's API), keeps the ones a model needs (config,
tokenizer, safetensors, unless told otherwise), checks there is room for
them, and downloads them into ``<models_dir>/.partial/<name>`` (the registry
skips dot directories). huggingface_hub's own downloader is not used: since
its 1.x releases each download goes to a process-unique temporary file that
is deleted on failure, so nothing resumes after a restart; ssw fetches the
hub's resolve URLs itself, with byte ranges from the partial file. Once every file
is there and matches the hub's size and checksum (sha256 for LFS files, the
git blob id for the others), the directory is renamed into the models dir in
one step: a model is either absent or complete. Jobs live in Redis
(``ssw:pull:<id>``); a loader that restarts resumes the jobs that were
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fnmatch
import hashlib
import logging
import os
import shutil
import time
import traceback
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import redis.asyncio as aioredis
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub import constants as hf_constants
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.exceptions import RedisError

from ssw.common.contract import NAME_RE, valid_name
from ssw.errors import BadRequest, MetricsUnavailable, ModelBusy, NoSpace, SswError

log = logging.getLogger(__name__)

# What a model needs to be served: config, tokenizer, weights, chat template.
DEFAULT_PATTERNS = (
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
)
PARTIAL_DIR = ".partial"
PARTIAL_PARTS = ".part"  # inside a pull's directory: files still downloading
KEY_PREFIX = "ssw:pull:"
INDEX_KEY = "ssw:pulls"
KEEP_JOBS = 200
PROGRESS_EVERY_S = 1.0
CHUNK = 1 << 20
MAX_REDIRECTS = 5
TRACEBACK_LINES = 12
REPO_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
REVISION_RE = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo: str = Field(pattern=REPO_RE, description="Hub repository, owner/name.")
    revision: str = Field(default="main", pattern=REVISION_RE, description="Branch, tag or commit.")
    name: str | None = Field(default=None, description="Model name and directory (default: the repo's name).")
    patterns: list[str] | None = Field(default=None, description="Files to fetch (glob); default: what a model needs.")

    @field_validator("revision")
    @classmethod
    def _no_dots(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("must not contain '..'")
        return value

    @field_validator("patterns")
    @classmethod
    def _plain_globs(cls, value: list[str] | None) -> list[str] | None:
        for p in value or []:
            if not p or len(p) > 128 or p.startswith("/") or ".." in p:
                raise ValueError(f"{p!r} is not a relative glob")
        return value

    def target(self) -> str:
        name = self.name or self.repo.rsplit("/", 1)[-1].lower()
        if not valid_name(name):
            raise BadRequest(f"name: {name!r} is not a valid model name ({NAME_RE.pattern}); pass one")
        return name


class HubFile(BaseModel):
    name: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git's sha1 of the blob


class Job(BaseModel):
    id: str
    repo: str
    revision: str
    commit: str | None = None  # what the revision resolved to
    name: str
    status: Status = "queued"
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    files: list[HubFile] = Field(default_factory=list)
    error: str | None = None
    traceback: str | None = None  # its last lines, on failure
    note: str = ""


def select(files: Iterable[HubFile], patterns: Iterable[str]) -> list[HubFile]:
    """The files whose name matches one of the globs, component by component: ``*``
    never crosses a ``/`` (``*.json`` is a top-level file, ``sub/*.json`` one folder down)."""
    pats = [p.split("/") for p in patterns]
    out = []
    for f in files:
        parts = f.name.split("/")
        if any(part.startswith(".") for part in parts):
            continue  # never what a model needs; the pull keeps its own state in dot names
        if any(
            len(p) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, p, strict=True)) for p in pats
        ):
            out.append(f)
    return out


def unsafe_name(name: str) -> str | None:
    """Why a name the hub lists cannot be a path inside the pull's directory, or None.
    The listing is the hub's word, and a hub (or a mirror) can lie."""
    if not name or len(name) > 1024:
        return "empty or over 1024 characters"
    if "\\" in name or "\0" in name:
        return "a backslash or NUL"
    if name.startswith("/"):
        return "absolute"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "an empty, '.' or '..' component"
    return None


def inside(root: Path, name: str) -> Path:
    """``root/name``, refused unless it resolves inside ``root`` (a link planted in the
    partial directory would lead elsewhere)."""
    path = root / name
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise PullFailed(f"{name!r} resolves outside the pull's directory")
    return path


def room(need: int, free: int, reserve: int) -> str | None:
    """Why there is no room for ``need`` more bytes, or None."""
    if need + reserve <= free:
        return None
    return (
        f"needs {need / 1e9:.2f} GB, and {free / 1e9:.2f} GB are free on the models dir's file system "
        f"(pulls.min_free_gb keeps {reserve / 1e9:.2f} GB free)"
    )


def verify(directory: Path, files: list[HubFile]) -> list[str]:
    """What differs from the hub's listing: missing files, sizes, checksums (blocking)."""
    problems = []
    for f in files:
        path = inside(directory, f.name)
        if not path.is_file() or path.is_symlink():
            problems.append(f"{f.name}: missing")
            continue
        size = path.stat().st_size
        if size != f.size:
            problems.append(f"{f.name}: {size} bytes, the hub lists {f.size}")
            continue
        if f.sha256:
            digest = hashlib.sha256()
        elif f.blob_id:
            digest = hashlib.sha1()  # git names a blob by the sha1 of "blob <size>\0<content>"
            digest.update(b"blob %d\0" % size)
        else:
            continue
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        want = f.sha256 or f.blob_id or ""
        if digest.hexdigest() != want:
            problems.append(f"{f.name}: checksum mismatch ({digest.hexdigest()[:12]}, the hub lists {want[:12]})")
    return problems


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


def list_files(repo: str, revision: str, endpoint: str | None, token: str | None) -> tuple[str, list[HubFile]]:
    """(commit, files) of a repository at a revision (blocking: the hub's API)."""
    info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision, files_metadata=True)
    files = [
        HubFile(
            name=s.rfilename,
            size=int(s.lfs.size if s.lfs else s.size or 0),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=None if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
    ]
    return str(info.sha), files


@dataclass
class Settings:
    models_dir: Path
    endpoint: str | None
    token_file: Path | None
    min_free_bytes: int
    allow_http: bool = False  # plain http:// to the hub and its CDN (a test hub, a mirror on a trusted net)


class Puller:
    """Runs pull jobs in the background and keeps them in Redis."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        on_done: Callable[[str], Any] | None = None,
        taken: Callable[[str], str | None] | None = None,
    ) -> None:
        self.s = settings
        self.redis = redis
        self.on_done = on_done  # the model's name, once it is in the models dir
        self.taken = taken  # why a name cannot be a new model's (an alias's, say), or None
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Target names with a pull from the moment it is asked for until it ends: claimed
        # before the first await, so two pulls of one name can never both start.
        self._claimed: set[str] = set()

    # --- jobs in Redis ------------------------------------------------------------------

    async def _save(self, job: Job) -> None:
        self._jobs[job.id] = job
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(KEY_PREFIX + job.id, job.model_dump_json())
                pipe.zadd(INDEX_KEY, {job.id: time.time()})
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("pull %s: cannot save the job to Redis: %s", job.id, exc)

    async def get(self, job_id: str) -> Job | None:
        if job_id in self._jobs:
            return self._jobs[job_id]
        try:
            raw = await self.redis.get(KEY_PREFIX + job_id)
        except (RedisError, OSError) as exc:
            raise MetricsUnavailable(f"the job store (Redis) is unavailable: {exc}") from exc
        return Job.model_validate_json(raw) if raw else None

    async def list(self) -> list[Job]:
        try:
            ids = await self.redis.zrevrange(INDEX_KEY, 0, KEEP_JOBS - 1)
        except (RedisError, OSError) as exc:
            raise MetricsUnavailable(f"the job store (Redis) is unavailable: {exc}") from exc
        jobs = [await self.get(i.decode() if isinstance(i, bytes) else str(i)) for i in ids]
        return [j for j in jobs if j is not None]

    # --- starting -------------------------------------------------------------------------

    def _token(self) -> str | None:
        if self.s.token_file is None:
            return None
        try:
            return self.s.token_file.read_text().strip() or None
        except OSError:
            return None

    def _partial(self, name: str) -> Path:
        return self.s.models_dir / PARTIAL_DIR / name

    def _to_write(self) -> int:
        """What the pulls running now still have to write."""
        return sum(max(j.bytes_total - j.bytes_done, 0) for j in self._jobs.values() if j.id in self._tasks)

    async def start(self, req: PullRequest) -> Job:
        name = req.target()
        if (self.s.models_dir / name).exists():
            raise ModelBusy(f"{self.s.models_dir / name} exists already: remove it, or pull under another name")
        if self.taken is not None and (why := self.taken(name)) is not None:
            raise BadRequest(f"name: {name!r} {why}; pull under another name")
        if name in self._claimed:
            raise ModelBusy(f"a pull of '{name}' is already under way")
        self._claimed.add(name)
        try:
            job = await self._start(req, name)
        except BaseException:
            self._claimed.discard(name)
            raise
        return job

    async def _start(self, req: PullRequest, name: str) -> Job:
        endpoint = self.s.endpoint or hf_constants.ENDPOINT  # HF_ENDPOINT, when set
        if not endpoint.startswith("https://") and not self.s.allow_http:
            raise BadRequest(f"the hub {endpoint!r} is not https:// (pulls.allow_http is off)")
        if (self.s.models_dir / name).exists():
            raise ModelBusy(f"{self.s.models_dir / name} exists already: remove it, or pull under another name")
        busy = [j for j in await self.list() if j.name == name and j.status in ACTIVE]
        if busy:
            raise ModelBusy(f"a pull of '{name}' is already {busy[0].status} (job {busy[0].id})")
        try:
            commit, files = await asyncio.to_thread(list_files, req.repo, req.revision, self.s.endpoint, self._token())
        except Exception as exc:  # the hub's errors: not found, gated, unreachable
            raise BadRequest(f"{req.repo}@{req.revision}: {type(exc).__name__}: {_first_line(exc)}") from exc
        # The whole listing is checked: a hub that lists a path outside the repository lies.
        bad = [(f.name, why) for f in files if (why := unsafe_name(f.name)) is not None]
        if bad:
            listed = "; ".join(f"{n[:80]!r}: {why}" for n, why in bad[:3])
            raise PullFailed(f"{req.repo}@{req.revision}: the hub lists file names that are not safe paths: {listed}")
        chosen = select(files, req.patterns or DEFAULT_PATTERNS)
        if any(f.size < 0 for f in chosen):
            raise PullFailed(f"{req.repo}@{req.revision}: the hub lists a negative file size")
        if not any(f.name in ("config.json", "adapter_config.json") for f in chosen):
            raise BadRequest(
                f"{req.repo}@{req.revision} has no config.json (nor a LoRA adapter's adapter_config.json) "
                "among the files to fetch: not a model"
            )
        total = sum(f.size for f in chosen)
        have = await asyncio.to_thread(_dir_bytes, self._partial(name))
        free = (await asyncio.to_thread(shutil.disk_usage, _existing(self.s.models_dir))).free
        # Pulls already running write into the same file system: what they still have to
        # write is not free.
        if (why := room(max(total - have, 0), free - self._to_write(), self.s.min_free_bytes)) is not None:
            raise NoSpace(f"pulling {req.repo}@{req.revision}: {why}")
        job = Job(
            id=f"pull-{uuid.uuid4().hex[:12]}",
            repo=req.repo,
            revision=req.revision,
            commit=commit,
            name=name,
            created_at=now_iso(),
            bytes_total=total,
            files=chosen,
        )
        await self._save(job)
        log.info("pull %s: %s@%s (%s) as %s: %d files, %.2f GB", job.id, job.repo, job.revision, commit, name,
                 len(chosen), total / 1e9)  # fmt: skip
        self._tasks[job.id] = asyncio.create_task(self._run(job))
        return job

    async def resume(self) -> None:
        """After a restart: jobs that were queued or running go on where they stopped."""
        with contextlib.suppress(SswError):
            for job in await self.list():
                if job.status in ACTIVE and job.id not in self._tasks:
                    job.note = "resumed after a loader restart"
                    log.info("pull %s: resuming %s (%s)", job.id, job.name, job.status)
                    self._claimed.add(job.name)
                    self._tasks[job.id] = asyncio.create_task(self._run(job))

    async def cancel(self, job_id: str) -> Job | None:
        job = await self.get(job_id)
        if job is None:
            return None
        if job.status not in ACTIVE:
            return job
        task = self._tasks.pop(job.id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await asyncio.to_thread(shutil.rmtree, self._partial(job.name), True)
        self._claimed.discard(job.name)
        job.status, job.finished_at, job.error = "cancelled", now_iso(), "cancelled"
        await self._save(job)
        log.info("pull %s: cancelled; its partial data is removed", job.id)
        return job

    async def close(self) -> None:
        """The loader stops: downloads stop too and resume when it starts again."""
        for task in self._tasks.values():
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(BaseException):
                await task

    # --- running --------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        partial = self._partial(job.name)
        job.status, job.started_at = "running", job.started_at or now_iso()
        await self._save(job)
        try:
            await asyncio.to_thread(partial.mkdir, parents=True, exist_ok=True)
            await self._download(job, partial)
            problems = await asyncio.to_thread(verify, partial, job.files)
            if problems:
                raise PullFailed("the files do not match the hub's listing: " + "; ".join(problems))
            await asyncio.to_thread(_finish, partial, self.s.models_dir / job.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            job.status, job.finished_at = "failed", now_iso()
            job.error = exc.message if isinstance(exc, SswError) else f"{type(exc).__name__}: {exc}"
            job.traceback = "".join(traceback.format_exception(exc)[-TRACEBACK_LINES:])
            await asyncio.to_thread(shutil.rmtree, partial, True)
            await self._save(job)
            log.error("pull %s: %s failed: %s", job.id, job.name, job.error)
            return
        finally:
            if self._tasks.pop(job.id, None) is not None:
                self._claimed.discard(job.name)
        job.status, job.finished_at, job.bytes_done = "succeeded", now_iso(), job.bytes_total
        await self._save(job)
        log.info("pull %s: %s is in %s", job.id, job.name, self.s.models_dir / job.name)
        if self.on_done is not None:
            await self.on_done(job.name)

    async def _download(self, job: Job, partial: Path) -> None:
        """Each file over HTTP from the hub's resolve URL at the pinned commit, into
        ``.part/<file>`` first; a partial file continues with a byte range (the
        hub and its CDN serve ranges), so a restarted pull goes on where it stopped.
        No file is written past its listed size: a hub that sends more fails the pull."""
        token = self._token()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
        job.bytes_done = await asyncio.to_thread(_dir_bytes, partial)
        saved = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout, max_line_size=8190, max_field_size=8190) as session:
            for f in job.files:
                if (why := unsafe_name(f.name)) is not None:  # a job resumed from Redis is checked again
                    raise PullFailed(f"{f.name[:80]!r} is not a safe path: {why}")
                dest = await asyncio.to_thread(inside, partial, f.name)
                part = await asyncio.to_thread(inside, partial, f"{PARTIAL_PARTS}/{f.name}")
                if await asyncio.to_thread(_size, dest) == f.size:
                    continue
                await asyncio.to_thread(part.parent.mkdir, parents=True, exist_ok=True)
                have = await asyncio.to_thread(_size, part) or 0
                if have > f.size:  # not what the listing says: start that file over
                    job.bytes_done -= have
                    have = 0
                if have < f.size or f.size == 0:
                    url = hf_hub_url(job.repo, f.name, revision=job.commit or job.revision, endpoint=self.s.endpoint)
                    async with _get(session, url, token, have, f.size, self.s.allow_http) as resp:
                        if resp is not None:
                            if have and resp.status == 200:  # the server ignored the range: start over
                                job.bytes_done -= have
                                have = 0
                            fh = await asyncio.to_thread(part.open, "ab" if have else "wb")
                            try:
                                async for chunk in resp.content.iter_chunked(CHUNK):
                                    if have + len(chunk) > f.size:
                                        raise PullFailed(
                                            f"{f.name}: the hub sent more than the {f.size} bytes it listed"
                                        )
                                    await asyncio.to_thread(fh.write, chunk)
                                    have += len(chunk)
                                    job.bytes_done += len(chunk)
                                    if time.monotonic() - saved >= PROGRESS_EVERY_S:
                                        saved = time.monotonic()
                                        await self._save(job)
                            finally:
                                await asyncio.to_thread(fh.close)
                # A .part already whole is verified with the rest, without asking the hub again.
                await asyncio.to_thread(_move, part, dest)
        shutil.rmtree(partial / PARTIAL_PARTS, ignore_errors=True)


@contextlib.asynccontextmanager
async def _get(
    session: aiohttp.ClientSession, url: str, token: str | None, have: int, size: int, allow_http: bool
) -> AsyncIterator[aiohttp.ClientResponse | None]:
    """GET from ``have`` on, following redirects by hand: the token goes to the hub's own
    host only, never to the CDN a large file redirects to, and never over plain http
    unless allowed. Yields None when the server says the file is whole already (416
    with ``Content-Range: bytes */<size>``, RFC 9110 15.5.17)."""
    origin = urllib.parse.urlsplit(url).netloc
    for _ in range(MAX_REDIRECTS):
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme != "https" and not (scheme == "http" and allow_http):
            raise PullFailed(f"{url[:200]}: only https:// is fetched (pulls.allow_http is off)")
        headers = {"Range": f"bytes={have}-"} if have else {}
        if token and urllib.parse.urlsplit(url).netloc == origin:
            headers["Authorization"] = f"Bearer {token}"
        resp = await session.get(url, headers=headers, allow_redirects=False)
        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
            url = urllib.parse.urljoin(url, resp.headers["Location"])
            resp.release()
            continue
        try:
            if resp.status == 416 and have and resp.headers.get("Content-Range", "") == f"bytes */{size}":
                yield None
                return
            if resp.status not in (200, 206):
                body = (await resp.content.read(200)).decode(errors="replace")
                raise PullFailed(f"{urllib.parse.urlsplit(url).path}: HTTP {resp.status}: {body}")
            if resp.content_length is not None and resp.content_length > size - (have if resp.status == 206 else 0):
                raise PullFailed(
                    f"{urllib.parse.urlsplit(url).path}: the hub offers {resp.content_length} bytes "
                    f"where {size} are listed"
                )
            yield resp
        finally:
            resp.release()
        return
    raise PullFailed(f"{url}: more than {MAX_REDIRECTS} redirects")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _move(part: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part.rename(dest)


class PullFailed(SswError):
    status = 502
    type = "pull_failed"
    code = "pull_failed"


def _finish(partial: Path, target: Path) -> None:
    """The directory into the models dir, in one rename."""
    if target.exists():
        raise PullFailed(f"{target} appeared while pulling: left as it is")
    partial.rename(target)
    with contextlib.suppress(OSError):
        partial.parent.rmdir()  # .partial, when no other pull runs


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
