"""Models across hosts, as one: forming a group (this host its head), starting and
stopping this host's ranks of groups other hosts head, and ending a group the
moment any part of it fails, on every host.

The group's record in the fleet's Redis (:mod:`ssw.loader.group_board`) is what
every host acts on. Each turn (``TURN_S``) this loader:

- as a head: renews its record, and breaks its head worker (which then loads
  again, with its waiters held, as any worker that died) when the record says
  the group is ending, is gone, or names a host that dropped out of the fleet;
- as a member: starts its rank of a group that names it, moves it to ready
  once the head says the group is, and stops a rank whose start is over (the
  record ended, gone, or replaced by a newer start);
- and a rank that ends on its own, anywhere, ends its group (:meth:`left`).

A new start is a new group id on a new master port: a rank of an earlier start
is stopped by its host and could not find the new group's port anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable

from ssw.common.contract import GroupMember, GroupRecord, HostRecord
from ssw.common.states import LEAVING, TERMINAL, WorkerState
from ssw.errors import LoadFailed, NoCapacity, SswError
from ssw.loader.decide.groups import MemberOption, choose_members, choose_port
from ssw.loader.group_board import BoardUnavailable, GroupBoard
from ssw.loader.models.registry import ModelSpec
from ssw.loader.netif import interface_of
from ssw.loader.systemd.engine import RankPart
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.retire import Retirer
from ssw.loader.workers.start import Starter
from ssw.loader.workers.table import Worker

log = logging.getLogger(__name__)

TURN_S = 1.0
RECENT_PORTS = 64  # master ports of this host's latest groups, never taken again soon
FORM_ATTEMPTS = 3  # heartbeats a head waits for hosts with room before it gives up


class Groups(Piece):
    def __init__(
        self,
        parts: Parts,
        board: GroupBoard,
        starter: Starter,
        retirer: Retirer,
        lost: Callable[[Worker, str], None],
    ) -> None:
        super().__init__(parts)
        self.board = board
        self.starter = starter
        self.retirer = retirer
        self.lost = lost  # the conductor's: a head whose group broke loads again
        self.host = self.cfg.fleet.host_name()
        self.address = self.cfg.fleet.rank_address()
        self._ports: list[int] = []
        self._rng = random.Random()
        self._starting: set[str] = set()  # group ids whose rank this host is starting
        starter.groups = self

    # --- as the head -------------------------------------------------------------------

    async def form(self, spec: ModelSpec) -> RankPart:
        """Choose and claim the hosts that run ``spec`` with this one as head: NoCapacity
        when the fleet has too few with room, LoadFailed when another host heads it."""
        span = spec.span
        assert span is not None
        if self.address is None:
            raise LoadFailed(f"{spec.name} spans hosts, but this host has no rank address (fleet.listen.host)")
        for attempt in range(FORM_ATTEMPTS):
            try:
                hosts = await self.board.hosts()
                standing = await self.board.get(spec.name)
            except BoardUnavailable as exc:
                raise LoadFailed(f"{spec.name} spans hosts, but the fleet's Redis cannot be reached: {exc}") from exc
            if standing is not None and standing.head != self.host and standing.head in hosts:
                raise LoadFailed(
                    f"{spec.name} runs across hosts headed by {standing.head} (group {standing.id}); ask there",
                    retry_after_s=2,
                )
            try:
                members = choose_members(spec.name, span.hosts - 1, self._options(spec.name, hosts))
                break
            except NoCapacity:
                # A host's record is up to a heartbeat old: one that just stopped a rank
                # of this model says so at its next one.
                if attempt == FORM_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(self.cfg.fleet.heartbeat_s)
        port = choose_port(self.cfg.fleet.rank_ports, self._ports, self._rng)
        self._ports = [*self._ports, port][-RECENT_PORTS:]
        record = GroupRecord(
            id=secrets.token_hex(8),
            model=spec.name,
            head=self.host,
            master_addr=self.address,  # type: ignore[arg-type]  # pydantic parses the text
            master_port=port,
            members=[
                GroupMember(host=self.host, rank=0, address=self.address),  # type: ignore[arg-type]
                *(
                    GroupMember(host=m.host, rank=i, address=m.address)  # type: ignore[arg-type]
                    for i, m in enumerate(members, start=1)
                ),
            ],
            at=time.time(),
        )
        try:
            if standing is None:
                standing = await self.board.claim(record)
            # A start of its own from before (failed, or a loader restart) gives way to this one.
            if standing is not None and not await self.board.take_over(standing, record):
                raise LoadFailed(f"{spec.name}: another host claimed its group meanwhile", retry_after_s=2)
        except BoardUnavailable as exc:
            raise LoadFailed(f"{spec.name}: its group cannot be claimed in the fleet's Redis: {exc}") from exc
        log.info("%s: group %s formed on port %d: %s", spec.name, record.id, port, record.describe())
        return await self._part(spec, record, 0)

    def _options(self, model: str, hosts: dict[str, HostRecord]) -> list[MemberOption]:
        out = []
        for name, record in hosts.items():
            if name == self.host:
                continue
            preview = record.previews.get(model)
            out.append(
                MemberOption(
                    name,
                    record.rank_address,
                    model in record.models,
                    preview.free_after_bytes if preview is not None else None,
                    preview.victims if preview is not None else 0,
                )
            )
        return out

    async def _part(self, spec: ModelSpec, record: GroupRecord, rank: int) -> RankPart:
        assert spec.span is not None and self.address is not None
        interface = await asyncio.to_thread(interface_of, self.address)
        return RankPart(spec.span, rank, record, self.address, interface)

    async def ready(self, head: Worker) -> None:
        """The head answers: the group is ready, and its members' ranks count as such."""
        assert head.part is not None
        record = head.part.group.model_copy(update={"state": "ready", "at": time.time()})
        with contextlib.suppress(BoardUnavailable):
            if await self.board.update(record):
                head.part = dataclasses.replace(head.part, group=record)

    # --- every turn ----------------------------------------------------------------------

    async def run(self) -> None:
        heard = time.monotonic()
        while True:
            try:
                await self.turn()
                heard = time.monotonic()
            except BoardUnavailable as exc:
                # Nothing is stopped for a blip. Past the TTL the others have dropped this
                # host (or its record of the group lapsed): its ranks are stopped here too.
                if time.monotonic() - heard > self.cfg.fleet.ttl_s:
                    self.cut_off(f"the fleet's Redis cannot be reached for over {self.cfg.fleet.ttl_s:.0f} s ({exc})")
            except Exception:
                log.exception("groups: a turn failed")
            await asyncio.sleep(TURN_S)

    def cut_off(self, why: str) -> None:
        """This host cannot follow its groups: stop every rank it runs (a partition leaves
        nothing half-running; its heads load again when the fleet is back)."""
        for worker in self.table:
            if worker.part is None or worker.state in LEAVING or worker.state in TERMINAL:
                continue
            if worker.part.rank == 0:
                self._break(worker, why)
            else:
                self.retirer.retire(worker, f"its group cannot be kept: {why}", cause="group")

    async def turn(self) -> None:
        records = await self.board.groups()
        if not any(r.member(self.host) for r in records.values()) and not any(w.part for w in self.table):
            return  # in no group: nothing to follow
        hosts = await self.board.hosts()
        for worker in self.table:
            if worker.part is None or worker.state in LEAVING or worker.state in TERMINAL:
                continue
            record = records.get(worker.model)
            current = record is not None and record.id == worker.part.group.id
            if worker.part.rank == 0:
                await self._keep_head(worker, record if current else None, hosts)
            elif not current or record is None or record.state == "ending":
                why = record.reason if current and record is not None else "its group's start is over"
                self.retirer.retire(worker, f"its group ended: {why}", cause="group")
            elif record.state == "ready" and worker.state is WorkerState.STARTING:
                worker.part = dataclasses.replace(worker.part, group=record)
                self.table.mark(worker, "healthy")
                self.table.move(worker, WorkerState.READY, f"its group is ready (head {record.head})")
        for record in records.values():
            me = record.member(self.host)
            if me is None or me.rank == 0 or record.state == "ending" or record.id in self._starting:
                continue
            if record.head not in hosts:
                await self.board.end(record, f"its head {record.head} dropped out of the fleet")
                continue
            if not any(w.part is not None and w.part.group.id == record.id for w in self.table):
                self._starting.add(record.id)
                self.tasks.spawn(self._start_rank(record, me.rank))

    async def _keep_head(self, worker: Worker, record: GroupRecord | None, hosts: dict[str, HostRecord]) -> None:
        if record is None:
            self._break(worker, "its group's record is gone from the fleet's Redis")
            return
        if record.state == "ending" and record.unloaded:
            self.retirer.retire(worker, f"its group was unloaded: {record.reason}", cause="unload")
            return
        if record.state == "ending":
            self._break(worker, record.reason)
            return
        dropped = [m.host for m in record.members if m.host != self.host and m.host not in hosts]
        if dropped:
            why = f"host {dropped[0]} dropped out of the fleet"
            await self.board.end(record, why)
            self._break(worker, why)
            return
        await self.board.renew(record)

    def _break(self, worker: Worker, why: str) -> None:
        """Stop the head of a group that broke; it loads again (a new group) as a worker that died."""
        log.warning("%s: its group broke: %s", worker.unit, why)
        worker.failure = f"its group broke: {why}"
        worker.retire_cause = "group"
        serving = worker.state in (WorkerState.READY, WorkerState.UNHEALTHY)
        self.table.move(worker, WorkerState.STOPPING, worker.failure)
        self.tasks.spawn(self.retirer.stop_unit(worker))
        if serving:
            self.lost(worker, f"{worker.unit}: {worker.failure}")

    # --- as a member ---------------------------------------------------------------------

    async def _start_rank(self, record: GroupRecord, rank: int) -> None:
        try:
            spec = self.catalog.models.get(record.model)
            if spec is None or spec.span is None or spec.span.hosts != len(record.members):
                raise LoadFailed(f"{self.host}'s models.yaml has no {record.model} across {len(record.members)} hosts")
            log.info("%s: starting rank %d of group %s (head %s)", record.model, rank, record.id, record.head)
            await self.starter.start_replica(spec, 1, part=await self._part(spec, record, rank))
        except SswError as exc:
            with contextlib.suppress(BoardUnavailable):
                await self.board.end(record, f"rank {rank} on {self.host} did not start: {exc.message}")
        finally:
            self._starting.discard(record.id)

    async def unload_from_member(self, rank: Worker) -> bool:
        """An unload asked of a host that runs a headless rank: the group is ended as
        unloaded (its head stops, and loads it no more); False when that cannot be said."""
        assert rank.part is not None
        try:
            return await self.board.end(rank.part.group, f"unload requested on {self.host}", unloaded=True)
        except BoardUnavailable:
            return False

    # --- a worker left -------------------------------------------------------------------

    def left(self, worker: Worker, state: WorkerState) -> None:
        """A rank left this host's table: a head takes its group's record with it (every
        member stops its rank); a rank that ended on its own ends its group."""
        part = worker.part
        if part is None:
            return
        if part.rank == 0:
            self.tasks.spawn(self._head_left(worker, state))
        elif state is WorkerState.FAILED:
            why = f"rank {part.rank} on {self.host} ended: {worker.failure or worker.state_reason}"
            self.tasks.spawn(self._quietly(self.board.end(part.group, why)))

    async def _head_left(self, worker: Worker, state: WorkerState) -> None:
        assert worker.part is not None
        with contextlib.suppress(BoardUnavailable):
            if state is WorkerState.FAILED:
                # Its engine most often ends on its own when a rank goes: say which one did.
                record = await self.board.get(worker.model)
                if record is not None and record.id == worker.part.group.id and record.state == "ending":
                    log.warning("%s: its group %s had ended: %s", worker.unit, record.id, record.reason)
            await self.board.delete(worker.part.group)

    async def adopted(self, model: str, rank: int, group: str) -> RankPart | None:
        """The part of a rank unit found running at start, if its start still stands."""
        spec = self.catalog.models.get(model)
        try:
            record = await self.board.get(model)
        except BoardUnavailable:
            return None
        if spec is None or spec.span is None or record is None or record.id != group or record.state == "ending":
            return None
        member = record.member(self.host)
        if member is None or member.rank != rank:
            return None
        return await self._part(spec, record, rank)

    @staticmethod
    async def _quietly(job: Awaitable[bool]) -> None:
        with contextlib.suppress(BoardUnavailable):
            await job
