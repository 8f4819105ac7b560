"""Deadlines against a stub loader: a model whose measured load ends past a request's
deadline fails the request at once (its load goes on), a held request fails at its
deadline rather than at gateway.wait_timeout_s, and one whose model is ready in time
is served."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ssw.common.contract import LoadProgress, ModelView, WorkerView
from ssw.common.states import WorkerState
from ssw.config import Config
from ssw.errors import DeadlineUnmet
from ssw.gateway.availability import Deadline, keepalive_comment
from ssw.gateway.handler import Gateway
from ssw.gateway.relay import Reply
from tests.unit.gateway.test_loader_client import StubLoader, client, until


async def nothing_sent(message: Any) -> None:
    raise AssertionError("nothing is sent while a plain request waits")


async def test_a_load_longer_than_the_deadline_fails_at_once_and_goes_on(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {"m": ModelView(load_seconds=30.0)}
    await loader.publish()
    async with client(url) as c:
        gw = Gateway(Config(), c)
        await until(lambda: c.connected)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeadlineUnmet) as raised:
            await gw.availability.workers_for(
                "m", "wait", "realtime", Reply(nothing_sent), False, deadline=Deadline.after(500)
            )
        assert loop.time() - t0 < 0.5  # not held: it could not have been served in time
        assert raised.value.retry_after_s in (29, 30) and raised.value.status == 503
        assert "deadline of 500 ms" in raised.value.message and loader.loads == ["m"]  # the load goes on
        assert gw.queue.depth("m") == 0
        await gw.close()


async def test_a_held_request_fails_at_its_deadline_not_at_the_wait_timeout(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {"m": ModelView(load_seconds=0.2)}
    await loader.publish()
    async with client(url) as c:
        gw = Gateway(Config.model_validate({"gateway": {"wait_timeout_s": 60}}), c)
        await until(lambda: c.connected)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeadlineUnmet):
            await gw.availability.workers_for(
                "m", "wait", "realtime", Reply(nothing_sent), False, deadline=Deadline.after(400)
            )
        assert 0.35 < loop.time() - t0 < 5  # held (its ETA was within the deadline), then let go
        assert gw.queue.depth("m") == 0 and loader.loads == ["m"]
        await gw.close()


async def test_a_model_ready_within_the_deadline_is_served(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {"m": ModelView(load_seconds=0.2)}
    await loader.publish()
    async with client(url) as c:
        gw = Gateway(Config(), c)
        await until(lambda: c.connected)
        waiting = asyncio.ensure_future(
            gw.availability.workers_for(
                "m", "wait", "realtime", Reply(nothing_sent), False, deadline=Deadline.after(5000)
            )
        )
        await until(lambda: gw.queue.depth("m") == 1)
        loader.workers = [
            WorkerView(
                unit="ssw-worker@m.service", model="m", replica=1, state=WorkerState.READY, gpus=[0], socket="/s"
            )
        ]
        await loader.publish()
        assert [w.unit for w in await asyncio.wait_for(waiting, 5)] == ["ssw-worker@m.service"]
        await gw.close()


def test_a_held_streams_keepalive_says_where_the_load_stands() -> None:
    progress = LoadProgress(kind="load", phase="engine_ready", started=100.0, expected_s=20.0)
    assert keepalive_comment("tiny", progress, 112.3) == (
        b": ssw: waiting for tiny: load, engine_ready, 12.3 s of ~20.0 s (ETA 7.7 s)\n\n"
    )
    first = LoadProgress(kind="wake", phase="waking", started=100.0)
    assert keepalive_comment("tiny", first, 101.0) == b": ssw: waiting for tiny: wake, waking, 1.0 s\n\n"
    assert keepalive_comment("tiny", None, 0.0) == b": ssw: waiting for tiny\n\n"
