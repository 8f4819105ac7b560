from __future__ import annotations

from pathlib import Path

import pytest

from ssw.config import MAX_SOCKET_PATH, SOCKET_DIR_NAME_MAX, SOCKET_NAME
from ssw.errors import BadRequest
from ssw.loader.systemd.bus import unit_object_path
from ssw.loader.systemd.units import (
    WorkerUnit,
    escape,
    instance_for,
    parse_size,
    parse_unit_name,
    socket_path,
    unescape,
    unit_name,
)


@pytest.mark.parametrize(
    ("model", "replica", "unit"),
    [
        ("qwen3-8b", 1, "ssw-worker@qwen3-8b.service"),
        ("qwen3-8b", 2, "ssw-worker@qwen3-8b:2.service"),
        ("Qwen2.5-14B-Instruct-AWQ", 1, "ssw-worker@Qwen2.5-14B-Instruct-AWQ.service"),
        ("a:b", 1, "ssw-worker@a\\x3ab.service"),
        ("a/b c", 1, "ssw-worker@a\\x2fb\\x20c.service"),
        (".hidden", 1, "ssw-worker@\\x2ehidden.service"),
        ("x@y.service", 1, "ssw-worker@x\\x40y.service.service"),
        ("zaż", 1, "ssw-worker@za\\xc5\\xbc.service"),
    ],
)
def test_unit_names_escape_the_model_part(model: str, replica: int, unit: str) -> None:
    assert unit_name(model, replica) == unit
    assert parse_unit_name(unit) == (model, replica)


def test_escaping_is_one_to_one() -> None:
    # The replica separator never appears in an escaped model name, so
    # "a:2" (a model) and replica 2 of "a" cannot collide.
    names = ["a", "a:2", "a\\x3a2", "a-2", "a_2", "a.2", "\\", "a\\"]
    units = {unit_name(n, r) for n in names for r in (1, 2)}
    assert len(units) == len(names) * 2
    for n in names:
        assert unescape(escape(n)) == n


@pytest.mark.parametrize(
    "unit",
    [
        "ssw-worker@a:1.service",
        "ssw-worker@a:x.service",
        "ssw-worker@a.socket",
        "other@a.service",
        "ssw-worker@a\\x2db.service",
        "ssw-worker@.service",
    ],
)
def test_foreign_or_non_canonical_units_are_not_ours(unit: str) -> None:
    assert parse_unit_name(unit) is None


def test_overlong_names_are_refused() -> None:
    with pytest.raises(BadRequest):
        unit_name("x" * 300)


def test_object_paths_follow_systemds_escaping() -> None:
    assert (
        unit_object_path("ssw-worker@qwen3-8b.service")
        == "/org/freedesktop/systemd1/unit/ssw_2dworker_40qwen3_2d8b_2eservice"
    )
    assert unit_object_path("1a.service").startswith("/org/freedesktop/systemd1/unit/_31a")


def test_transient_properties_carry_slice_accounting_and_environment() -> None:
    unit = WorkerUnit(
        name="ssw-worker@m.service",
        description="d",
        argv=("/py", "-m", "x"),
        env={"CUDA_VISIBLE_DEVICES": "1"},
        slice="ssw-workers.slice",
        user="ssw-worker",
        stop_timeout_s=30,
        memory_max_bytes=2**30,
        log_extra={"SSW_MODEL": "m"},
        socket_dir=Path("/run/ssw/workers/m-0123456789"),
        cache_directory="ssw/m",
        devices=("/dev/nvidia1", "/dev/nvidiactl"),
    )
    props = dict(unit.properties())
    assert props["ExecStart"] == ("a(sasb)", [("/py", ["/py", "-m", "x"], False)])
    assert props["Environment"] == ("as", ["CUDA_VISIBLE_DEVICES=1"])
    assert props["Slice"] == ("s", "ssw-workers.slice")
    assert props["MemoryAccounting"] == ("b", True)
    assert props["CollectMode"] == ("s", "inactive-or-failed")
    assert props["TimeoutStopUSec"] == ("t", 30_000_000)
    assert props["User"] == ("s", "ssw-worker")
    assert props["MemoryMax"] == ("t", 2**30)
    assert props["LimitNOFILE"] == props["LimitNOFILESoft"] == ("t", 65536)
    assert props["LogExtraFields"] == ("aay", [b"SSW_MODEL=m"])


def test_workers_are_confined_to_their_socket_cache_and_gpus() -> None:
    unit = WorkerUnit(
        name="ssw-worker@m.service",
        description="d",
        argv=("/py",),
        env={},
        slice="ssw-workers.slice",
        user="ssw-worker",
        stop_timeout_s=30,
        memory_max_bytes=None,
        log_extra={},
        socket_dir=Path("/run/ssw/workers/m-0123456789"),
        cache_directory="ssw/m",
        devices=("/dev/nvidia1", "/dev/nvidiactl"),
    )
    props = dict(unit.properties())
    # No network but its own loopback: vLLM's internal ports are out of everyone's reach.
    assert props["PrivateNetwork"] == ("b", True)
    assert props["ReadWritePaths"] == ("as", ["/run/ssw/workers/m-0123456789"])
    assert props["ProtectSystem"] == ("s", "strict") and props["ProtectHome"] == ("s", "read-only")
    assert props["CacheDirectory"] == ("as", ["ssw/m"]) and props["CacheDirectoryMode"] == ("u", 0o700)
    assert props["DevicePolicy"] == ("s", "closed")
    assert props["DeviceAllow"] == ("a(ss)", [("/dev/nvidia1", "rw"), ("/dev/nvidiactl", "rw")])
    assert props["NoNewPrivileges"] == ("b", True) and props["CapabilityBoundingSet"] == ("t", 0)
    assert props["UMask"] == ("u", 0o007)  # its socket: group rwx for the gateway, nothing for others
    assert props["RestrictAddressFamilies"] == ("(bas)", (True, ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]))
    assert "MemoryMax" not in props


@pytest.mark.parametrize(
    ("replica", "replicas", "taken", "instance"),
    [
        (1, 1, set(), 1),
        (2, 2, {"ssw-worker@m.service"}, 2),
        # Replica 1's old unit is still draining: the new one takes the first number past the replicas.
        (1, 1, {"ssw-worker@m.service"}, 2),
        (1, 2, {"ssw-worker@m.service", "ssw-worker@m:2.service"}, 3),
        (2, 2, {"ssw-worker@m:2.service", "ssw-worker@m:3.service"}, 4),
    ],
)
def test_a_new_worker_never_takes_a_unit_name_still_loaded(
    replica: int, replicas: int, taken: set[str], instance: int
) -> None:
    assert instance_for("m", replica, replicas, taken) == instance
    assert unit_name("m", instance) not in taken


def test_socket_paths_derive_from_the_unit_and_stay_short() -> None:
    root = Path("/run/ssw/workers")
    a = socket_path(root, "ssw-worker@qwen3-8b.service")
    assert a.parent.parent == root and a.name == SOCKET_NAME
    assert a.parent.name.startswith("qwen3-8b-")
    assert socket_path(root, "ssw-worker@qwen3-8b.service") == a  # deterministic
    assert socket_path(root, "ssw-worker@qwen3-8b:2.service") != a
    long = socket_path(root, unit_name("x" * 128 + "\\é", 17))
    assert len(long.parent.name) <= SOCKET_DIR_NAME_MAX and len(str(long)) <= MAX_SOCKET_PATH
    assert "\\" not in long.parent.name and ":" not in long.parent.name


@pytest.mark.parametrize(("text", "size"), [("64G", 64 * 2**30), ("512M", 512 * 2**20), ("1024", 1024), ("1.5K", 1536)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
