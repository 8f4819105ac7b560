"""The port through which the batch tier uses the gateway: what it may ask, and
nothing more. The gateway (:class:`ssw.gateway.handler.Gateway`) implements it;
the batch tier (:mod:`ssw.batch`) depends only on this protocol, so neither wing
imports the other and a test can stand in a fake gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ssw.common.auth import ApiKey
from ssw.common.contract import ModelView, Snapshot, WorkerView
from ssw.common.routes import Route

# (key, route, model, body) -> the answer's status, body and headers
AsyncAcceptor = Callable[[ApiKey | None, Route, str, bytes], Awaitable[tuple[int, bytes, list[tuple[bytes, bytes]]]]]


@dataclass(slots=True)
class Answer:
    """A whole answer to a request ssw made itself."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class NameView(Protocol):
    """Names, aliases and workers as the gateway sees them now."""

    @property
    def models(self) -> Mapping[str, ModelView]: ...
    @property
    def ready(self) -> Mapping[str, Sequence[WorkerView]]: ...
    @property
    def live(self) -> Mapping[str, Sequence[WorkerView]]: ...
    @property
    def remote(self) -> Mapping[str, Sequence[WorkerView]]: ...
    def resolve(self, name: object) -> str: ...


class Serving(Protocol):
    """What the batch tier asks of the gateway."""

    on_async: AsyncAcceptor | None  # set by the batch tier: it takes X-SSW-Async requests

    @property
    def metrics_registry(self) -> CollectorRegistry: ...
    @property
    def snapshot(self) -> Snapshot | None: ...
    @property
    def names(self) -> NameView: ...
    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> ApiKey | None: ...
    def key_named(self, name: str) -> ApiKey | None: ...
    def admit_line(self, key: ApiKey | None, route: Route, body: dict[str, Any]) -> str:
        """The model a request body resolves to under the public route's rules (the key's
        scope, the model's capabilities, the limits); the domain error otherwise."""
        ...

    def interactive_queued(self, model: str) -> int: ...
    async def request_load(self, model: str, protect_s: float) -> None: ...
    async def execute(self, key: ApiKey | None, route: Route, body: bytes, priority: str = "batch") -> Answer: ...
