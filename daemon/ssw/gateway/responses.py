"""Stored Responses (``/v1/responses`` with ``store``): a stored response lives in
the memory of the worker that made it, so a retrieve, a cancel or a follow-up
(``previous_response_id``) must reach that worker, on this host or, in a fleet,
through the gateway of the host that holds it. The book of who holds what is in
Redis (:mod:`ssw.gateway.response_book`)."""

from __future__ import annotations

from collections.abc import Callable

from ssw.common.auth import ApiKey
from ssw.common.contract import WorkerView
from ssw.common.routes import RESPONSE_ID
from ssw.config import Config
from ssw.errors import ResponseNotFound
from ssw.gateway.accounting import Exchange
from ssw.gateway.admission import Admission
from ssw.gateway.fleet import FleetView
from ssw.gateway.names import Names, remote_worker
from ssw.gateway.response_book import Holder, ResponseBook


class StoredResponses:
    def __init__(
        self,
        cfg: Config,
        book: ResponseBook,
        admission: Admission,
        names: Callable[[], Names],
        fleet: FleetView | None,
    ) -> None:
        self.cfg = cfg
        self.book = book
        self.admission = admission
        self._names = names
        self.fleet = fleet

    @property
    def names(self) -> Names:
        return self._names()

    async def holder(self, response_id: object, key: ApiKey | None) -> Holder:
        """Who holds a stored response the caller may see; the same 404 for one that
        does not exist, belongs to another key, or to a model outside the key's scope."""
        missing = ResponseNotFound(f"No response found with id '{str(response_id)[:80]}'.")
        if not isinstance(response_id, str) or not RESPONSE_ID.match(response_id):
            raise missing
        holder = await self.book.find(response_id)
        if holder is None or (self.cfg.auth.enabled and holder.key != (key.name if key else "")):
            raise missing
        names = self.names
        allowed = self.admission.allowed_models(key, names.expand)
        if holder.model not in names.models or (allowed is not None and holder.model not in allowed):
            raise missing
        return holder

    def holding_worker(self, holder: Holder, response_id: str) -> WorkerView:
        if self.fleet is not None and holder.host and holder.host != self.fleet.host:
            record = self.fleet.hosts.get(holder.host)
            if record is not None and self.fleet.reachable(holder.host):
                # Held on another host: its gateway relays it (and checks the owner again).
                return remote_worker(holder.host, holder.model, record.url)
            raise ResponseNotFound(
                f"Response '{response_id}' is held on host {holder.host}, which cannot be reached from here now."
            )
        for worker in self.names.ready.get(holder.model, ()):
            if worker.unit == holder.unit:
                return worker
        raise ResponseNotFound(
            f"Response '{response_id}' was held by {holder.unit}, which no longer serves; a stored response "
            "lives in its worker's memory and ends with it."
        )

    async def note(self, ex: Exchange, response_id: str) -> None:
        # Relayed from another host's gateway: that host notes it (its worker holds it).
        if RESPONSE_ID.match(response_id) and ex.worker and "/" not in ex.worker:
            host = self.fleet.host if self.fleet is not None else ""
            await self.book.remember(response_id, Holder(ex.model, ex.worker, ex.key, host))
