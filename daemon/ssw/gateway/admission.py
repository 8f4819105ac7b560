"""Who may call, and what a request must look like before any worker is touched:
API keys and their scopes, per-key limits, the body's size, JSON shape and
nesting, and the fields ssw relies on. Everything else in a body passes
through to vLLM untouched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson

from ssw.common.auth import ApiKey, Forbidden, KeyRing, bearer
from ssw.common.routes import Route
from ssw.config import Config
from ssw.errors import BadRequest, HeadersTooLarge, ModelNotFound, PayloadTooLarge, RequestTimeout, TooManyRequests
from ssw.gateway.accounting import Exchange

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
ANTHROPIC_ROLES = ("user", "assistant")


def too_deep(value: Any, limit: int) -> bool:
    """Whether JSON containers nest deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        obj, depth = stack.pop()
        children = obj.values() if type(obj) is dict else obj
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The request body as a JSON object; BadRequest for anything else."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            raise BadRequest(f"the request body nests deeper than {max_depth} levels") from None
        raise BadRequest("the request body is not valid JSON") from None
    if type(body) is not dict:
        raise BadRequest("the request body must be a JSON object")
    if too_deep(body, max_depth):
        raise BadRequest(f"the request body nests deeper than {max_depth} levels")
    return body


class Admission:
    def __init__(self, cfg: Config, keys: KeyRing) -> None:
        self.cfg = cfg
        self.limits = cfg.limits
        self.keys = keys
        self.in_flight: dict[str, int] = {}  # API key name -> requests in flight

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> ApiKey | None:
        """The caller's key (None when auth is off); 401 for a missing or wrong key.
        OpenAI SDKs send it as a bearer token, Anthropic's as x-api-key."""
        size = 0
        secret = None
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"authorization":
                secret = bearer(value.decode("latin-1")) or secret
            elif name == b"x-api-key":
                secret = secret or value.decode("latin-1").strip() or None
        if size > self.limits.max_header_bytes:
            raise HeadersTooLarge(f"request headers exceed {self.limits.max_header_bytes} bytes")
        if not self.cfg.auth.enabled:
            return None
        return self.keys.check(secret)

    def check_scope(self, key: ApiKey | None, asked: str, model: str | None, resolve: Callable[[str], str]) -> None:
        """403 for a model outside the key's scope, whether or not that model exists.
        ``model`` is what ``asked`` resolves to (None: nothing)."""
        allowed = self.allowed_models(key, resolve)
        if allowed is None or (key is not None and key.models is not None and asked in key.models):
            return
        if model is None or model not in allowed:
            raise Forbidden("This API key may not use that model.")

    @staticmethod
    def allowed_models(key: ApiKey | None, resolve: Callable[[str], str]) -> set[str] | None:
        if key is None or key.models is None:
            return None
        out = set()
        for entry in key.models:
            try:
                out.add(resolve(entry))
            except (ModelNotFound, BadRequest):
                continue
        return out

    def admit(self, key: ApiKey | None, ex: Exchange) -> None:
        if key is None:
            return
        cap = self.limits.max_in_flight_per_key
        limit = min(key.max_in_flight or cap, cap)
        current = self.in_flight.get(key.name, 0)
        if current >= limit:
            raise TooManyRequests(f"this API key already has {limit} requests in flight")
        self.in_flight[key.name] = current + 1
        ex.admitted = True

    def release(self, ex: Exchange) -> None:
        if ex.admitted:
            ex.admitted = False
            self.in_flight[ex.key] -= 1

    async def read_body(self, declared: bytes | None, chunks: AsyncIterator[bytes], limit: int | None = None) -> bytes:
        limit = limit or self.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        parts: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
                parts.append(chunk)

        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                await read()
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.limits.body_timeout_s:.0f} s") from None
        return b"".join(parts)

    def validate(self, body: dict[str, Any], route: Route, max_tokens_ceiling: int | None) -> None:
        """The fields ssw relies on, checked before any worker is touched; the rest
        passes through to vLLM untouched."""
        if "stream" in body and type(body["stream"]) is not bool:
            raise BadRequest("'stream' must be a boolean")
        check = _CHECKS.get(route.path)
        if check is not None:
            check(self, body)
        for field_name in route.token_fields:
            value = body.get(field_name)
            if value is None:
                continue
            if type(value) is not int or value < 1:
                raise BadRequest(f"'{field_name}' must be a positive integer")
            if max_tokens_ceiling and value > max_tokens_ceiling:
                raise BadRequest(f"'{field_name}' may be at most {max_tokens_ceiling} for this model")

    def _messages(self, body: dict[str, Any], roles: tuple[str, ...]) -> None:
        messages = body.get("messages")
        if type(messages) is not list or not messages:
            raise BadRequest("'messages' must be a non-empty array")
        if len(messages) > self.limits.max_messages:
            raise BadRequest(f"at most {self.limits.max_messages} messages per request")
        for i, m in enumerate(messages):
            if type(m) is not dict or m.get("role") not in roles:
                raise BadRequest(f"messages[{i}]: an object whose 'role' is one of {', '.join(roles)}")

    def _chat(self, body: dict[str, Any]) -> None:
        self._messages(body, CHAT_ROLES)

    def _anthropic(self, body: dict[str, Any]) -> None:
        # Anthropic's API takes the system prompt as a field, not as a message.
        self._messages(body, ANTHROPIC_ROLES)

    def _anthropic_create(self, body: dict[str, Any]) -> None:
        self._anthropic(body)
        if "max_tokens" not in body:
            raise BadRequest("'max_tokens' is required")


def _text_or_array(name: str) -> Callable[[Admission, dict[str, Any]], None]:
    def check(_: Admission, body: dict[str, Any]) -> None:
        if not isinstance(body.get(name), str | list):
            raise BadRequest(f"'{name}' must be a string or an array")

    return check


def _responses(_: Admission, body: dict[str, Any]) -> None:
    _text_or_array("input")(_, body)
    # vLLM makes a client's request_id the stored response's id: a key that knows
    # another key's id could take that response over.
    if "request_id" in body:
        raise BadRequest("'request_id' is not accepted on /v1/responses: ssw's workers choose a response's id")


def _embeddings(_: Admission, body: dict[str, Any]) -> None:
    # vLLM embeds either 'input' or, chat-style, 'messages'.
    if not isinstance(body.get("input"), str | list) and not isinstance(body.get("messages"), list):
        raise BadRequest("'input' must be a string or an array")


def _tokenize(_: Admission, body: dict[str, Any]) -> None:
    if not isinstance(body.get("prompt"), str | list) and not isinstance(body.get("messages"), list):
        raise BadRequest("'prompt' (a string) or 'messages' (an array) is required")


def _detokenize(_: Admission, body: dict[str, Any]) -> None:
    tokens = body.get("tokens")
    if type(tokens) is not list or not all(type(t) is int for t in tokens):
        raise BadRequest("'tokens' must be an array of integers")


_CHECKS: dict[str, Callable[[Admission, dict[str, Any]], None]] = {
    "/v1/chat/completions": Admission._chat,
    "/v1/completions": _text_or_array("prompt"),
    "/v1/responses": _responses,
    "/v1/messages": Admission._anthropic_create,
    "/v1/messages/count_tokens": Admission._anthropic,
    "/v1/embeddings": _embeddings,
    "/tokenize": _tokenize,
    "/detokenize": _detokenize,
}
