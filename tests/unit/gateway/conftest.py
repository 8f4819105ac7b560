"""A stub loader on a port of its own, for the gateway's tests that follow one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.unit.gateway.test_loader_client import StubLoader, serve


@pytest.fixture
async def stub() -> AsyncIterator[tuple[StubLoader, str]]:
    loader = StubLoader()
    async with serve(loader) as url:
        yield loader, url
