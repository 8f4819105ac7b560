"""Who holds a stored response: noted once per id, never taken over by another key."""

from __future__ import annotations

import uuid

import pytest

from ssw.common.redis_sink import client
from ssw.gateway.response_book import Holder, ResponseBook
from tests.harness.stack import RedisServer


@pytest.mark.parametrize("with_redis", [False, True])
async def test_an_id_noted_for_one_key_is_never_taken_over_by_another(
    with_redis: bool, redis_server: RedisServer
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    book = ResponseBook(client(redis_server.url) if with_redis else None, 60, 100, prefix)
    other = ResponseBook(client(redis_server.url) if with_redis else None, 60, 100, prefix)  # another process
    try:
        mine = Holder("m", "ssw-worker@m-1.service", "alice")
        assert await book.remember("resp_1", mine)
        assert await book.remember("resp_1", mine)  # the same key again: fine
        assert not await book.remember("resp_1", Holder("m", "ssw-worker@m-1.service", "mallory"))
        assert await book.find("resp_1") == mine
        if with_redis:
            assert not await other.remember("resp_1", Holder("m", "ssw-worker@m-2.service", "mallory"))
            assert await other.find("resp_1") == mine
    finally:
        await book.close()
        await other.close()
