"""Errors at the HTTP edges: every error leaves as one OpenAI-shaped envelope
that also says which part of ssw produced it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ssw.errors import SswError, clip

log = logging.getLogger(__name__)


def envelope(
    message: str, type_: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    body.update(extra)
    return {"error": body}


def error_response(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(envelope(message, type_, code, **extra), status_code=status, headers=headers)


def from_exception(exc: SswError, source: str) -> JSONResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    extra: dict[str, Any] = {"details": exc.details} if exc.details else {}
    return error_response(
        exc.status, exc.message, exc.type, exc.code, headers=headers or None, source=source, param=exc.param, **extra
    )


def install(app: FastAPI, source: str) -> None:
    """Map every exception an app can raise onto the envelope."""

    @app.exception_handler(SswError)
    async def _ssw(_: Request, exc: SswError) -> JSONResponse:
        return from_exception(exc, source)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(
            envelope(
                f"{param or 'request'}: {first.get('msg')}",
                "invalid_request_error",
                "invalid_request",
                param,
                source=source,
            ),
            status_code=422 if param else 400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            # Most often a vLLM path that is not relayed (/sleep, /collective_rpc, ...).
            message = f"No such route: {request.method} {clip(request.url.path)} (the API's routes: /openapi.json)"
        return error_response(
            exc.status_code,
            message,
            "invalid_request_error",
            source=source,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal error in ssw; see its journal", "internal_error", source=source)
