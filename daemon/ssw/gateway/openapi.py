"""The OpenAPI document of the proxy routes: the request bodies ssw reads, each
with the fields it checks; every other field passes through to vLLM, so the
schemas allow additional properties. Published at /openapi.json."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ssw.common.routes import Body, Route
from ssw.gateway.admission import ANTHROPIC_ROLES, CHAT_ROLES

# The request bodies ssw reads; every other field passes through to vLLM, so
# the schemas allow additional properties. Published at /openapi.json.
_MODEL = {"type": "string", "description": "A model name or alias."}
_MAX_TOKENS = {"type": "integer", "minimum": 1}


def _messages(roles: Iterable[str]) -> dict[str, Any]:
    """A non-empty list of messages with one of these roles (chat's and Anthropic's differ)."""
    item = {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"type": "string", "enum": list(roles)}, "content": {}},
    }
    return {"type": "array", "minItems": 1, "items": item}


REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": _MODEL,
            "messages": _messages(CHAT_ROLES),
            "max_tokens": _MAX_TOKENS,
            "max_completion_tokens": _MAX_TOKENS,
            "stream": {"type": "boolean"},
        },
    },
    "/v1/completions": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {"model": _MODEL, "prompt": {}, "max_tokens": _MAX_TOKENS, "stream": {"type": "boolean"}},
    },
    "/v1/embeddings": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": _MODEL, "input": {}},
    },
    "/v1/responses": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": _MODEL,
            "input": {},
            "previous_response_id": {"type": "string"},
            "max_output_tokens": _MAX_TOKENS,
            "stream": {"type": "boolean"},
        },
    },
    "/v1/messages": {
        "type": "object",
        "required": ["model", "messages", "max_tokens"],
        "properties": {
            "model": _MODEL,
            "messages": _messages(ANTHROPIC_ROLES),
            "max_tokens": _MAX_TOKENS,
            "stream": {"type": "boolean"},
        },
    },
    "/detokenize": {
        "type": "object",
        "required": ["model", "tokens"],
        "properties": {"model": _MODEL, "tokens": {"type": "array", "items": {"type": "integer"}}},
    },
}
_ERROR = {"description": "An OpenAI error envelope.", "content": {"application/json": {"schema": {"type": "object"}}}}


_FORM = {
    "type": "object",
    "required": ["model", "file"],
    "properties": {"model": _MODEL, "file": {"type": "string", "format": "binary"}, "stream": {"type": "boolean"}},
}


def openapi_extra(route: Route) -> dict[str, Any]:
    header = {"in": "header", "required": False, "schema": {"type": "string"}}
    parameters: list[dict[str, Any]] = [
        {**header, "name": "Authorization", "description": "Bearer <API key> (or x-api-key: <API key>)"},
        {
            **header,
            "name": "X-SSW-Priority",
            "schema": {"type": "string", "enum": ["realtime", "interactive", "batch"]},
        },
    ]
    doc: dict[str, Any] = {"parameters": parameters}
    if route.body is Body.NONE:
        parameters.append({"in": "path", "name": "response_id", "required": True, "schema": {"type": "string"}})
    else:
        parameters += [
            {**header, "name": "X-SSW-Wait", "description": "true: hold the request while the model loads"},
            {**header, "name": "X-SSW-Fallback", "description": "true: a fallback model may answer"},
        ]
        if route.body is Body.MULTIPART:
            content = {"multipart/form-data": {"schema": _FORM}}
        else:
            schema = REQUEST_SCHEMAS.get(
                route.path, {"type": "object", "required": ["model"], "properties": {"model": _MODEL}}
            )
            content = {"application/json": {"schema": schema}}
        doc["requestBody"] = {"required": True, "content": content}
    doc["responses"] = {
        "200": {"description": "The worker's answer (JSON, or server-sent events when streaming)."},
        "202": {"description": "The model is loading; retry after Retry-After seconds (not_loaded: accept)."},
        **{code: _ERROR for code in ("400", "401", "403", "404", "408", "413", "422", "429", "431", "503")},
    }
    return doc
