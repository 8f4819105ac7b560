"""The group records in a real Redis: one start claims a model's group, only that start
may change or end it, and what does not match the contract is ignored."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from ssw.common.contract import GroupRecord
from ssw.config import FleetSettings
from ssw.loader.group_board import GROUPS, MAX_RECORD_BYTES, GroupBoard, group_key
from tests.harness.stack import RedisServer


def record(group: str = "0123456789abcdef", model: str = "big", head: str = "hosta") -> GroupRecord:
    return GroupRecord.model_validate(
        {
            "id": group,
            "model": model,
            "head": head,
            "master_addr": "10.0.0.2",
            "master_port": 29611,
            "members": [
                {"host": head, "rank": 0, "address": "10.0.0.2"},
                {"host": "hostb", "rank": 1, "address": "10.0.0.3"},
            ],
            "at": time.time(),
        }
    )


@pytest.fixture
async def board(redis_server: RedisServer) -> AsyncIterator[GroupBoard]:
    settings = FleetSettings.model_validate(
        {
            "redis_url": redis_server.url,
            "host": "hosta",
            "advertise_url": "http://10.0.0.2:8443",
            "listen": {"host": "10.0.0.2", "port": 8443},
            "insecure": True,
            "ttl_s": 5,
        }
    )
    b = GroupBoard(settings)
    await b._redis.flushdb()
    yield b
    await b.close()


async def test_one_start_claims_a_model_and_only_it_may_change_it(board: GroupBoard) -> None:
    first, second = record(), record("fedcba9876543210", head="hostc")
    assert await board.claim(first) is None
    assert await board.claim(second) == first  # the standing start, not the newcomer
    assert 0 < await board._redis.pttl(group_key("big")) <= 5000
    assert await board.groups() == {"big": first}
    # An older start (another id) can neither end nor replace nor delete it.
    assert not await board.end(second, "late news")
    assert not await board.delete(second)
    assert (await board.get("big")) == first
    assert await board.end(first, "rank 1 on hostb ended")
    ended = await board.get("big")
    assert ended is not None and ended.state == "ending" and ended.reason == "rank 1 on hostb ended"
    # Its head's next start takes it over; then the old one is gone for good.
    assert await board.take_over(first, second)
    assert await board.get("big") == second
    assert not await board.renew(first) and await board.renew(second)
    assert await board.delete(second)
    assert await board.get("big") is None
    assert await board.groups() == {}
    assert not await board._redis.sismember(GROUPS, "big")  # listed no longer


async def test_what_does_not_match_the_contract_is_ignored(board: GroupBoard) -> None:
    await board._redis.sadd(GROUPS, "big", "odd", "huge", "other")
    await board._redis.set(group_key("big"), record().model_dump_json())
    await board._redis.set(group_key("odd"), '{"id": "x; rm -rf /", "model": "odd"}')
    await board._redis.set(group_key("huge"), "x" * (MAX_RECORD_BYTES + 1))
    # A record filed under another model's name is not that model's group.
    await board._redis.set(group_key("other"), record(model="big").model_dump_json())
    assert list(await board.groups()) == ["big"]
