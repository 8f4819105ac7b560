"""Who may call, and what a request must look like before any worker is touched:
API keys and their scopes (or, on the fleet listener, a peer's signed claim),
per-key limits, the body's size, JSON shape and nesting, the model it names and
what that model serves, and the fields ssw relies on. Everything else in a body
passes through to vLLM untouched.

:meth:`Admission.admit` is the one call a route makes: it returns an
:class:`Admitted` request or raises the domain error the client gets. The batch
tier's input lines pass :meth:`Admission.check`, the same rules."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ssw.common.auth import ApiKey, Forbidden, KeyRing, bearer, read_token
from ssw.common.bodies import parse_body
from ssw.common.contract import ModelView
from ssw.common.routes import Body, Route
from ssw.config import Config
from ssw.errors import (
    BadRequest,
    HeadersTooLarge,
    ModelNotFound,
    NotServed,
    PayloadTooLarge,
    RequestTimeout,
    SswError,
    TooManyRequests,
)
from ssw.gateway import hops
from ssw.gateway.accounting import Exchange
from ssw.gateway.fleet import FleetView
from ssw.gateway.forms import Form, parse_form
from ssw.gateway.names import Names
from ssw.gateway.waitqueue import parse_priority

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
ANTHROPIC_ROLES = ("user", "assistant")
PRIORITY_HEADER = b"x-ssw-priority"
# Where a request that ssw itself makes (a batch line, an async job) carries its
# caller: a key in the ASGI scope, which no HTTP client can set.
INTERNAL = "ssw.internal"
FLEET_LISTENER = "ssw.fleet_listener"  # set on requests that came in on the fleet listener


@dataclass(frozen=True, slots=True)
class Internal:
    """A request the asynchronous tier runs on behalf of an API key (None: auth off)."""

    key: ApiKey | None


@dataclass(slots=True)
class Admitted:
    """A request that passed admission: who sent it, its body read and parsed, and
    (for a route that names a model) the model it resolved to within the key's scope."""

    key: ApiKey | None
    headers: dict[bytes, bytes]
    raw: bytes
    body: dict[str, Any] = field(default_factory=dict)
    form: Form | None = None
    claim: hops.Claim | None = None  # a hop from another host's gateway: its signed claim
    internal: bool = False  # a batch line or async job ssw runs itself
    asked: object = None  # the name the client sent
    model: str = ""
    entry: ModelView | None = None
    stream: bool = False


class Admission:
    def __init__(self, cfg: Config, keys: KeyRing, fleet: FleetView | None = None) -> None:
        self.cfg = cfg
        self.limits = cfg.limits
        self.keys = keys
        self.fleet = fleet
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

    async def operator(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Whether the caller may open the status page: a key with the operator flag, or
        the loader's admin token where the gateway can read it; 401 or 403 otherwise.
        With auth off the page is as open as every other route."""
        headers = list(headers)
        secret = next((bearer(v.decode("latin-1")) for k, v in headers if k == b"authorization"), None)
        admin = await asyncio.to_thread(read_token, self.cfg.auth.admin_token_file) if secret else None
        if admin and secret and hmac.compare_digest(admin.encode(), secret.encode()):
            return
        key = self.authenticate(headers)
        if key is not None and not key.operator:
            raise Forbidden("This API key may not open the status page (ssw keys add NAME --operator).")

    @staticmethod
    def _check_scope(key: ApiKey | None, asked: str, model: str | None, allowed: set[str] | None) -> None:
        """403 for a model outside the key's scope (``allowed``), whether or not that model
        exists. ``model`` is what ``asked`` resolves to (None: nothing)."""
        if allowed is None or (key is not None and key.models is not None and asked in key.models):
            return
        if model is None or model not in allowed:
            raise Forbidden("This API key may not use that model.")

    @staticmethod
    def allowed_models(key: ApiKey | None, expand: Callable[[str], set[str]]) -> set[str] | None:
        """The models a key may use (None: all): each name in its scope, as ``expand`` says
        (an alias its model, a split every model of it)."""
        if key is None or key.models is None:
            return None
        out: set[str] = set()
        for entry in key.models:
            try:
                out |= expand(entry)
            except (ModelNotFound, BadRequest):
                continue
        return out

    def admit_key(self, key: ApiKey | None, ex: Exchange) -> None:
        """A place within the key's in-flight limit (given back by :meth:`release`)."""
        if key is None:
            return
        cap = self.limits.max_in_flight_per_key
        limit = min(key.max_in_flight or cap, cap)
        current = self.in_flight.get(key.name, 0)
        if current >= limit:
            raise TooManyRequests(f"this API key already has {limit} requests in flight")
        self.in_flight[key.name] = current + 1
        ex.admitted = True

    async def admit(
        self, scope: dict[str, Any], receive: Callable[[], Any], ex: Exchange, route: Route, names: Callable[[], Names]
    ) -> Admitted:
        """Everything between a request's head and its worker, in one call: who sent it
        (a key, a peer's claim, or ssw itself), its place within the key's in-flight
        limit, the body read within its limits and parsed, and the model it names,
        resolved within the key's scope, able to serve the route, within its limits."""
        got = self._caller(scope, ex)
        multipart = route.body is Body.MULTIPART
        got.raw = await self.read_body(
            got.headers.get(b"content-length"),
            body_chunks(receive),
            self.limits.max_upload_bytes if multipart else self.limits.max_body_bytes,
        )
        if route.body is Body.NONE:
            if got.claim is not None:
                hops.check_body(got.claim, got.raw)
            return got
        if multipart:
            got.form = parse_form(got.raw, got.headers.get(b"content-type"))
            got.body = {"model": got.form.value("model")}
            if (stream_field := got.form.value("stream")) is not None:
                got.body["stream"] = stream_field.strip().lower() == "true"
        else:
            got.body = parse_body(got.raw, self.limits.max_json_depth)
        if got.claim is not None:
            hops.check_body(got.claim, got.raw)
        got.asked = got.body.get("model")
        view = names()
        got.model = self.check(got.key, got.body, route, view)
        got.entry = view.models[got.model]
        ex.model = got.model
        ex.stream = got.stream = got.body.get("stream") is True
        return got

    def check(self, key: ApiKey | None, body: dict[str, Any], route: Route, names: Names) -> str:
        """The model a parsed body names, within the key's scope, able to serve the route,
        and the body within that model's limits (a public request and a batch line alike)."""
        asked = body.get("model")
        if asked is None:
            raise BadRequest("'model' is required")
        model = self.resolve_in_scope(key, asked, names, body)
        entry = names.models[model]
        if route.family not in entry.capabilities:
            raise NotServed(
                f"'{model}' does not serve {route.path}: it serves {', '.join(entry.capabilities) or 'nothing'}"
                " (GET /v1/models lists what each model can do)"
            )
        self.validate(body, route, entry.max_tokens)
        return model

    def resolve_in_scope(
        self, key: ApiKey | None, asked: object, names: Names, body: dict[str, Any] | None = None
    ) -> str:
        """The model ``asked`` names, within the key's scope (an A/B split: the model this
        caller sticks to). Outside it the answer is the same 403 whether or not the model
        exists."""
        who = names.who(asked, key.name if key else None, (body or {}).get("user"))
        allowed = self.allowed_models(key, names.expand)
        try:
            resolved: str | None = names.resolve(asked, who, allowed)
            unknown: SswError | None = None
        except (ModelNotFound, BadRequest) as exc:
            resolved, unknown = None, exc
        # Outside the scope, the same 403 whether or not the model exists.
        self._check_scope(key, asked if isinstance(asked, str) else "", resolved, allowed)
        if unknown is not None:
            raise unknown
        assert resolved is not None
        return resolved

    def hop_caller(self, scope: dict[str, Any]) -> tuple[hops.Claim, ApiKey | None]:
        """A peer's signed claim (on the fleet listener only) and the key it names, looked
        up on this host."""
        claim = self._hop_claim(scope, dict(scope["headers"]))
        return claim, self._claimed_key(claim)

    def _caller(self, scope: dict[str, Any], ex: Exchange) -> Admitted:
        headers: dict[bytes, bytes] = dict(scope["headers"])
        internal: Internal | None = scope.get(INTERNAL)
        if internal is not None:
            # Authenticated when it was submitted; its concurrency is the runner's to bound.
            got = Admitted(internal.key, headers, b"", internal=True)
        elif scope.get(FLEET_LISTENER) or hops.HEADER in headers:
            # Another host's gateway, for a client it authenticated: its signed claim names
            # the key, which this host looks up itself and holds to its scope and limits.
            claim, key = self.hop_caller(scope)
            self.admit_key(key, ex)  # that key's in-flight limit, counted on this host
            ex.key, ex.priority = claim.key, parse_priority(claim.priority)
            return Admitted(key, headers, b"", claim=claim)
        else:
            key = self.authenticate(scope["headers"])
            self.admit_key(key, ex)
            got = Admitted(key, headers, b"")
        ex.key = got.key.name if got.key else ""
        ex.priority = parse_priority(headers[PRIORITY_HEADER].decode("latin-1") if PRIORITY_HEADER in headers else None)
        return got

    def _hop_claim(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> hops.Claim:
        if not scope.get(FLEET_LISTENER) or self.fleet is None:
            raise hops.BadClaim("fleet claims are taken only on the fleet listener, never on the public port")
        header = headers.get(hops.HEADER)
        if header is None:
            raise hops.BadClaim("the fleet listener serves only hops, each with a claim signed by the fleet")
        return self.fleet.check(header, scope["method"], _target(scope))

    def _claimed_key(self, claim: hops.Claim) -> ApiKey | None:
        if not self.cfg.auth.enabled:
            return None
        key = self.keys.named(claim.key)
        if key is None:
            raise hops.BadClaim(f"the fleet claim names API key {claim.key[:64]!r}, which this host does not know")
        return key

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


async def body_chunks(receive: Callable[[], Any]) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client left before sending its whole body")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _target(scope: dict[str, Any]) -> str:
    """The request's path and query, as signed in a hop's claim."""
    query = scope.get("query_string", b"")
    return scope["path"] + ("?" + query.decode("latin-1") if query else "")
