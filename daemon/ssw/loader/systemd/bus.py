"""systemd's manager over D-Bus (dbus-fast): transient worker units, their
state, and change notifications. The only module that talks to systemd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ssw.errors import SystemdError
from ssw.loader.systemd.units import WorkerUnit

log = logging.getLogger(__name__)

DEST = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPS = "org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"

StateCallback = Callable[[str, str, str], None]


def unit_object_path(name: str) -> str:
    """systemd's object path for a unit (bus_label_escape: [A-Za-z] kept, digits kept
    except first, every other byte as _xx)."""
    label = []
    for i, byte in enumerate(name.encode()):
        ch = chr(byte)
        keep = ch.isascii() and (ch.isalpha() or (i > 0 and ch.isdigit()))
        label.append(ch if keep else f"_{byte:02x}")
    return UNIT_PATH_PREFIX + ("".join(label) or "_")


@dataclass(frozen=True)
class UnitStatus:
    name: str
    active_state: str
    sub_state: str
    path: str


@dataclass(frozen=True)
class UnitDetails:
    name: str
    active_state: str
    sub_state: str
    main_pid: int
    environment: dict[str, str]
    memory_current: int | None
    cpu_usage_ns: int | None
    active_enter_us: int
    slice: str
    transient: bool


def _unset(value: int) -> int | None:
    # systemd reports "not available" as UINT64_MAX.
    return None if value >= 2**64 - 1 else value


class Systemd:
    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._job_results: dict[str, str] = {}
        self._job_waiters: dict[str, asyncio.Future[str]] = {}
        self._state_callbacks: list[StateCallback] = []
        self._watched: dict[str, str] = {}  # object path -> unit name
        bus.add_message_handler(self._on_message)

    @classmethod
    async def connect(cls, address: str | None = None) -> Systemd:
        try:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        except (OSError, ValueError, Exception) as exc:  # dbus-fast raises several types here
            raise SystemdError(f"cannot connect to the system bus ({address or 'default'}): {exc}") from exc
        self = cls(bus)
        for rule in (
            f"type='signal',interface='{MANAGER}',member='JobRemoved',path='{MANAGER_PATH}'",
            f"type='signal',interface='{PROPS}',member='PropertiesChanged',arg0='{UNIT_IFACE}',"
            f"path_namespace='/org/freedesktop/systemd1/unit'",
        ):
            await self._call(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule]
            )
        # Without Subscribe systemd only emits signals that someone else asked for.
        await self._manager("Subscribe", "", [])
        return self

    @property
    def connected(self) -> bool:
        return self._bus.connected

    async def wait_disconnected(self) -> None:
        await self._bus.wait_for_disconnect()

    def close(self) -> None:
        self._bus.disconnect()

    def on_state_change(self, callback: StateCallback) -> None:
        self._state_callbacks.append(callback)

    def watch(self, unit: str) -> None:
        """Report ActiveState/SubState changes of this unit to the callbacks."""
        self._watched[unit_object_path(unit)] = unit

    def unwatch(self, unit: str) -> None:
        self._watched.pop(unit_object_path(unit), None)

    # --- low level --------------------------------------------------------------

    async def _call(self, dest: str, path: str, iface: str, member: str, sig: str, body: list[Any]) -> list[Any]:
        reply = await self._bus.call(
            Message(destination=dest, path=path, interface=iface, member=member, signature=sig, body=body)
        )
        if reply is None:
            raise SystemdError(f"{member}: no reply from D-Bus")
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise SystemdError(f"{member} failed: {reply.error_name}: {detail}")
        return list(reply.body)

    async def _manager(self, member: str, sig: str, body: list[Any]) -> list[Any]:
        return await self._call(DEST, MANAGER_PATH, MANAGER, member, sig, body)

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == "JobRemoved" and msg.interface == MANAGER:
            _id, job, _unit, result = msg.body
            # Kept for a while: the signal can beat the method reply that names the
            # job, and two calls for one unit may be given the same (merged) job.
            self._job_results[job] = result
            if len(self._job_results) > 1024:
                self._job_results.pop(next(iter(self._job_results)))
            waiter = self._job_waiters.pop(job, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result)
        elif msg.member == "PropertiesChanged" and msg.path in self._watched:
            changed = msg.body[1]
            if "ActiveState" in changed or "SubState" in changed:
                unit = self._watched[msg.path]
                active = changed["ActiveState"].value if "ActiveState" in changed else ""
                sub = changed["SubState"].value if "SubState" in changed else ""
                for cb in list(self._state_callbacks):
                    try:
                        cb(unit, active, sub)
                    except Exception:  # a callback's bug must not kill the bus reader
                        log.exception("unit state callback failed for %s", unit)
        return False

    async def _wait_job(self, job: str, timeout: float) -> str:
        if job in self._job_results:
            return self._job_results[job]
        # One outcome per job, shared by everyone who waits for it.
        fut = self._job_waiters.get(job)
        if fut is None:
            fut = self._job_waiters[job] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise SystemdError(f"systemd job {job} did not finish within {timeout:.0f} s") from None

    # --- units ------------------------------------------------------------------

    async def start_transient(self, unit: WorkerUnit, timeout: float = 60.0) -> None:
        props = [[key, Variant(sig, value)] for key, (sig, value) in unit.properties()]
        self.watch(unit.name)
        try:
            (job,) = await self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit.name, "fail", props, []])
            result = await self._wait_job(job, timeout)
        except BaseException:
            self.unwatch(unit.name)
            raise
        if result != "done":
            self.unwatch(unit.name)
            raise SystemdError(f"starting {unit.name}: job {result}; see 'journalctl -u {unit.name}'")

    async def stop(self, name: str, timeout: float) -> None:
        try:
            (job,) = await self._manager("StopUnit", "ss", [name, "replace"])
        except SystemdError as exc:
            if "NoSuchUnit" in str(exc):
                return
            raise
        result = await self._wait_job(job, timeout)
        if result not in ("done", "canceled"):
            raise SystemdError(f"stopping {name}: job {result}")

    async def set_description(self, name: str, text: str) -> None:
        """Change a running unit's description (what `systemctl status` shows), until it stops."""
        await self._manager("SetUnitProperties", "sba(sv)", [name, True, [["Description", Variant("s", text)]]])

    async def kill(self, name: str, signal: int) -> None:
        await self._manager("KillUnit", "ssi", [name, "all", signal])

    async def reset_failed(self, name: str) -> None:
        with contextlib.suppress(SystemdError):  # nothing to reset
            await self._manager("ResetFailedUnit", "s", [name])

    async def list_units(self, pattern: str) -> list[UnitStatus]:
        (units,) = await self._manager("ListUnitsByPatterns", "asas", [[], [pattern]])
        return [UnitStatus(name=u[0], active_state=u[3], sub_state=u[4], path=u[6]) for u in units]

    async def _get_all(self, path: str, iface: str) -> dict[str, Any]:
        (props,) = await self._call(DEST, path, PROPS, "GetAll", "s", [iface])
        return {k: v.value for k, v in props.items()}

    async def details(self, name: str) -> UnitDetails | None:
        """Live properties of a loaded unit; None when systemd does not know it."""
        try:
            (path,) = await self._manager("GetUnit", "s", [name])
        except SystemdError as exc:
            if "NoSuchUnit" in str(exc):
                return None
            raise
        unit = await self._get_all(path, UNIT_IFACE)
        svc = await self._get_all(path, SERVICE_IFACE)
        env: dict[str, str] = {}
        for item in svc.get("Environment", []):
            key, _, value = item.partition("=")
            env[key] = value
        return UnitDetails(
            name=name,
            active_state=unit.get("ActiveState", ""),
            sub_state=unit.get("SubState", ""),
            main_pid=int(svc.get("MainPID", 0)),
            environment=env,
            memory_current=_unset(int(svc.get("MemoryCurrent", 2**64 - 1))),
            cpu_usage_ns=_unset(int(svc.get("CPUUsageNSec", 2**64 - 1))),
            active_enter_us=int(unit.get("ActiveEnterTimestamp", 0)),
            slice=str(svc.get("Slice", "")),
            transient=bool(unit.get("Transient", False)),
        )

    async def unit_by_pid(self, pid: int) -> str | None:
        try:
            (path,) = await self._manager("GetUnitByPID", "u", [pid])
        except SystemdError:
            return None
        (value,) = await self._call(DEST, path, PROPS, "Get", "ss", [UNIT_IFACE, "Id"])
        return str(value.value)
