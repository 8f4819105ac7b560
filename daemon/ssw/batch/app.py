"""The asynchronous tier's HTTP API on the public port: OpenAI's Files and
Batch APIs (``/v1/files``, ``/v1/batches``), and async single requests
(``X-SSW-Async: true`` on any JSON route, followed at ``/v1/ssw/jobs/{id}``).

Every file, batch and job belongs to the API key that created it; another key
gets the same 404 as for one that does not exist. A batch's input file is
checked whole when the batch is created, with the synchronous routes' own
admission rules, so a bad line is a 400 naming its line number and nothing
is created.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from ssw.batch.input import ENDPOINTS, read_lines
from ssw.batch.metrics import BatchMetrics
from ssw.batch.runner import Runner
from ssw.batch.states import BatchStatus, JobStatus
from ssw.batch.store import BatchStore, file_view
from ssw.common.auth import ApiKey
from ssw.common.routes import Route, match
from ssw.common.serving import Serving
from ssw.config import Config
from ssw.errors import BadRequest, PayloadTooLarge, SswError, clip

log = logging.getLogger(__name__)
WINDOW = re.compile(r"^(\d{1,6})([smhd])\Z")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FILE_PURPOSES = ("batch",)
MAX_METADATA = 16
BOARD_ITEMS = 50  # batches and jobs the status page shows, each


class NotFound(SswError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class LengthRequired(SswError):
    status = 411
    type = "invalid_request_error"
    code = "length_required"


class BatchCreate(BaseModel):
    # Fields newer SDKs send that ssw does not use (output_expires_after) are ignored.
    model_config = ConfigDict(extra="ignore")
    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(default="24h", max_length=16)
    metadata: dict[str, str] | None = None


class AsyncTier:
    """Files, batches and async jobs: the store, the runner, and their routes."""

    def __init__(self, cfg: Config, gw: Serving, store: BatchStore, runner: Runner) -> None:
        self.cfg = cfg
        self.settings = cfg.batch
        self.gw = gw
        self.store = store
        self.runner = runner
        gw.on_async = self.accept_job

    @classmethod
    async def create(cls, cfg: Config, gw: Serving) -> AsyncTier:
        store = BatchStore(cfg.redis_url, cfg.batch.dir, cfg.batch.retain_s)
        await asyncio.to_thread(store.prepare)
        runner = Runner(cfg, gw, store, BatchMetrics(gw.metrics_registry))
        return cls(cfg, gw, store, runner)

    def start(self) -> None:
        self.runner.start()

    async def close(self) -> None:
        await self.runner.close()
        await self.store.close()

    async def board_summary(self) -> dict[str, Any]:
        """What the status page shows of this tier: the batches and async jobs in progress
        (the oldest BOARD_ITEMS of each), with their counts; never their contents."""
        shown = ("id", "model", "status", "total", "completed", "failed", "created_at", "owner", "attempts")
        batches = []
        for batch_id in (await self.store.active_batches())[:BOARD_ITEMS]:
            record = await self.store.batch(batch_id)
            if record is not None:
                batches.append({k: record[k] for k in shown if k in record})
        jobs = []
        for job_id in (await self.store.active_jobs())[:BOARD_ITEMS]:
            record = await self.store.job(job_id)
            if record is not None:
                jobs.append({k: record[k] for k in shown if k in record})
        return {"batches": batches, "jobs": jobs}

    def _owner(self, request: Request) -> tuple[ApiKey | None, str]:
        key = self.gw.authenticate(request.headers.raw)
        return key, key.name if key else ""

    # --- files ---------------------------------------------------------------------------

    async def upload(self, request: Request) -> dict[str, Any]:
        _, owner = self._owner(request)
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise LengthRequired("an upload needs a Content-Length")
        limit = self.settings.max_file_bytes
        if int(declared) > limit + 64 * 1024:  # the form around the file
            raise PayloadTooLarge(f"the file exceeds {limit} bytes (batch.max_file_bytes)")
        form = await request.form(max_files=1, max_fields=8)
        try:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(purpose, str) or purpose not in FILE_PURPOSES:
                raise _bad(f"'purpose' must be one of {', '.join(FILE_PURPOSES)}", "purpose")
            if not isinstance(upload, UploadFile):
                raise _bad("'file' (a file part) is required", "file")
            size = upload.size or 0
            if size > limit:
                raise PayloadTooLarge(f"the file exceeds {limit} bytes (batch.max_file_bytes)")
            name = Path(upload.filename or "upload.jsonl").name[:255]

            def write(path: Path) -> None:
                upload.file.seek(0)
                with open(path, "wb") as out:
                    shutil.copyfileobj(upload.file, out)

            return await self.store.add_file(owner, name, purpose, size, write)
        finally:
            await form.close()

    async def file(self, request: Request, file_id: str) -> dict[str, Any]:
        _, owner = self._owner(request)
        return file_view(await self._file(file_id, owner))

    async def _file(self, file_id: str, owner: str) -> dict[str, str]:
        record = await self.store.file_record(file_id, owner)
        if record is None:
            raise NotFound(f"No such File object: {clip(file_id)}")
        return record

    async def content(self, request: Request, file_id: str) -> Response:
        _, owner = self._owner(request)
        await self._file(file_id, owner)
        try:
            data = await self.store.read_file(file_id)
        except FileNotFoundError:
            raise NotFound(f"No such File object: {clip(file_id)}") from None
        return Response(data, media_type="application/octet-stream")

    async def delete_file(self, request: Request, file_id: str) -> dict[str, Any]:
        _, owner = self._owner(request)
        if not await self.store.delete_file(file_id, owner):
            raise NotFound(f"No such File object: {clip(file_id)}")
        return {"id": file_id, "object": "file", "deleted": True}

    async def files(
        self, request: Request, purpose: str | None, limit: int, after: str | None, order: str
    ) -> dict[str, Any]:
        _, owner = self._owner(request)
        data = await self.store.list_files(owner, purpose, limit, after, order == "desc")
        return _page(data, limit)

    # --- batches --------------------------------------------------------------------------

    async def create_batch(self, request: Request, req: BatchCreate) -> dict[str, Any]:
        key, owner = self._owner(request)
        record = await self.store.file_record(req.input_file_id, owner)
        if record is None:
            raise _bad(f"No such File object: {clip(req.input_file_id)}", "input_file_id", NotFound)
        if record.get("purpose") != "batch":
            raise _bad("the input file's purpose must be 'batch'", "input_file_id")
        window = self._window(req.completion_window)
        found = match("POST", req.endpoint) if req.endpoint in ENDPOINTS else None
        if found is None:
            raise _bad(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", "endpoint")
        if req.metadata is not None and (
            len(req.metadata) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in req.metadata.items())
        ):
            raise _bad(f"'metadata': at most {MAX_METADATA} pairs, keys of 64 and values of 512 characters", "metadata")
        data = await self.store.read_file(req.input_file_id)
        lines = await asyncio.to_thread(
            read_lines,
            data,
            req.endpoint,
            self._checker(key, found[0]),
            self.settings.max_lines,
            self.cfg.limits.max_body_bytes,
            self.cfg.limits.max_json_depth,
        )
        now = time.time()
        batch_id = await self.store.create_batch(
            owner,
            {
                "endpoint": req.endpoint,
                "input_file_id": req.input_file_id,
                "completion_window": req.completion_window,
                "metadata": req.metadata,
                "expires_at": str(int(now + window)),
                "models": sorted({line.model for line in lines}),
            },
            len(lines),
        )
        log.info("batch %s: %d requests to %s from key %s", batch_id, len(lines), req.endpoint, owner or "-")
        self.runner.poke()
        return await self._batch_view(batch_id, owner)

    def _window(self, text: str) -> float:
        m = WINDOW.match(text)
        seconds = int(m.group(1)) * UNITS[m.group(2)] if m else 0
        if not m or not 0 < seconds <= self.settings.max_completion_window_s:
            raise _bad(
                "'completion_window' must be a duration such as 24h (s, m, h or d), "
                f"at most {self.settings.max_completion_window_s / 3600:.0f}h",
                "completion_window",
            )
        return seconds

    def _checker(self, key: ApiKey | None, route: Route) -> Any:
        """The synchronous route's admission rules for one line's body: the model it
        resolves to (in the key's scope, able to serve the route), within its limits."""

        def check(body: dict[str, Any]) -> str:
            return self.gw.admit_line(key, route, body)

        return check

    async def batch(self, request: Request, batch_id: str) -> dict[str, Any]:
        _, owner = self._owner(request)
        return await self._batch_view(batch_id, owner)

    async def _batch_view(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        record = await self.store.batch(batch_id, owner)
        if record is None:
            raise NotFound(f"No such Batch object: {clip(batch_id)}")
        return batch_view(record)

    async def cancel(self, request: Request, batch_id: str) -> dict[str, Any]:
        _, owner = self._owner(request)
        view = await self._batch_view(batch_id, owner)
        if view["status"] in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            await self.store.move_batch(batch_id, BatchStatus.CANCELLING)
            self.runner.poke()
        elif view["status"] != BatchStatus.CANCELLING:
            raise BadRequest(f"a batch that is {view['status']} cannot be cancelled")
        return await self._batch_view(batch_id, owner)

    async def batches(self, request: Request, after: str | None, limit: int) -> dict[str, Any]:
        _, owner = self._owner(request)
        data = [batch_view(r) for r in await self.store.list_batches(owner, after, limit)]
        return _page(data, limit)

    # --- async single requests -------------------------------------------------------------

    async def accept_job(
        self, key: ApiKey | None, route: Route, model: str, body: bytes
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        owner = key.name if key else ""
        record = await self.store.create_job(
            owner,
            {"endpoint": route.path, "model": model, "expires_at": str(int(time.time() + self.settings.job_timeout_s))},
            body,
        )
        self.runner.poke()
        location = f"/v1/ssw/jobs/{record['id']}"
        headers = [(b"location", location.encode()), (b"retry-after", b"1")]
        return 202, orjson.dumps(await self._job_view(record)), headers

    async def job(self, request: Request, job_id: str) -> dict[str, Any]:
        _, owner = self._owner(request)
        record = await self.store.job(job_id, owner)
        if record is None:
            raise NotFound(f"No such job: {clip(job_id)}")
        return await self._job_view(record)

    async def cancel_job(self, request: Request, job_id: str) -> dict[str, Any]:
        _, owner = self._owner(request)
        record = await self.store.job(job_id, owner)
        if record is None:
            raise NotFound(f"No such job: {clip(job_id)}")
        if not await self.store.move_job(job_id, JobStatus.CANCELLED):
            raise BadRequest(f"a job that is {record.get('status')} cannot be cancelled")
        return await self._job_view(await self.store.job(job_id) or record)

    async def _job_view(self, record: dict[str, str]) -> dict[str, Any]:
        status = record.get("status", "")
        response = None
        if "response_status" in record:
            path = self.store.job_path(record["id"], "response")
            try:
                response = orjson.loads(await asyncio.to_thread(path.read_bytes))
            except (FileNotFoundError, orjson.JSONDecodeError):
                response = None
        error = record.get("error")
        return {
            "id": record["id"],
            "object": "ssw.job",
            "status": status,
            "endpoint": record.get("endpoint"),
            "model": record.get("model"),
            "created_at": _iso(record.get("created_at")),
            "started_at": _iso(record.get("started_at")),
            "completed_at": _iso(record.get("completed_at")),
            "expires_at": _iso(record.get("expires_at")),
            "attempts": int(record.get("attempts", "0")),
            "response": response,
            "error": orjson.loads(error) if error else None,
        }

    # --- routes -----------------------------------------------------------------------------

    def install(self, app: FastAPI) -> None:
        tags: list[str | enum.Enum] = ["async"]
        app.add_api_route("/v1/files", self.upload, methods=["POST"], tags=tags, summary="Upload a file")

        async def files(
            request: Request,
            purpose: str | None = Query(default=None, max_length=32),
            limit: int = Query(default=10_000, ge=1, le=10_000),
            after: str | None = Query(default=None, max_length=64),
            order: str = Query(default="desc", pattern="^(asc|desc)$"),
        ) -> dict[str, Any]:
            return await self.files(request, purpose, limit, after, order)

        app.add_api_route("/v1/files", files, methods=["GET"], tags=tags, summary="List files")
        app.add_api_route("/v1/files/{file_id}", self.file, methods=["GET"], tags=tags, summary="Retrieve a file")
        app.add_api_route(
            "/v1/files/{file_id}", self.delete_file, methods=["DELETE"], tags=tags, summary="Delete a file"
        )
        app.add_api_route(
            "/v1/files/{file_id}/content", self.content, methods=["GET"], tags=tags, summary="A file's content"
        )
        app.add_api_route("/v1/batches", self.create_batch, methods=["POST"], tags=tags, summary="Create a batch")

        async def batches(
            request: Request,
            after: str | None = Query(default=None, max_length=64),
            limit: int = Query(default=20, ge=1, le=100),
        ) -> dict[str, Any]:
            return await self.batches(request, after, limit)

        app.add_api_route("/v1/batches", batches, methods=["GET"], tags=tags, summary="List batches")
        app.add_api_route("/v1/batches/{batch_id}", self.batch, methods=["GET"], tags=tags, summary="Retrieve a batch")
        app.add_api_route(
            "/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"], tags=tags, summary="Cancel a batch"
        )
        app.add_api_route(
            "/v1/ssw/jobs/{job_id}", self.job, methods=["GET"], tags=tags, summary="An async request's job"
        )
        app.add_api_route(
            "/v1/ssw/jobs/{job_id}", self.cancel_job, methods=["DELETE"], tags=tags, summary="Cancel an async job"
        )


def batch_view(record: dict[str, str]) -> dict[str, Any]:
    """A batch as OpenAI's API shows it."""

    def stamp(name: str) -> int | None:
        value = record.get(name)
        return int(value) if value else None

    errors = record.get("errors")
    metadata = record.get("metadata")
    completed, failed = int(record.get("completed", "0")), int(record.get("failed", "0"))
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record.get("endpoint"),
        "errors": orjson.loads(errors) if errors else None,
        "input_file_id": record.get("input_file_id"),
        "completion_window": record.get("completion_window"),
        "status": record.get("status"),
        "output_file_id": record.get("output_file_id"),
        "error_file_id": record.get("error_file_id"),
        "created_at": stamp("created_at"),
        "in_progress_at": stamp("in_progress_at"),
        "expires_at": stamp("expires_at"),
        "finalizing_at": stamp("finalizing_at"),
        "completed_at": stamp("completed_at"),
        "failed_at": stamp("failed_at"),
        "expired_at": stamp("expired_at"),
        "cancelling_at": stamp("cancelling_at"),
        "cancelled_at": stamp("cancelled_at"),
        "request_counts": {"total": int(record.get("total", "0")), "completed": completed, "failed": failed},
        "metadata": orjson.loads(metadata) if metadata and metadata != "null" else None,
    }


def _page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    shown = data[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(data) > limit,
    }


def _iso(value: str | None) -> str | None:
    if not value:
        return None
    return datetime.datetime.fromtimestamp(int(value), datetime.UTC).isoformat().replace("+00:00", "Z")


def _bad(message: str, param: str, kind: type[SswError] = BadRequest) -> SswError:
    exc = kind(message)
    exc.param = param
    return exc
