"""What there is to do: slots shared fairly between keys, and a batch that fails
(its results cannot be written) failed and logged once."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable

import pytest

from ssw.batch.backlog import Backlog, BatchWork, Task, fair_share
from ssw.batch.results import Results
from ssw.config import Config


def tasks(owner: str, n: int, kind: str = "line", not_before: float = 0.0) -> deque[Task]:
    return deque(Task("m", job_id=f"{owner}-{kind}-{i}", owner=owner, not_before=not_before) for i in range(n))


def ids(picked: list[Task]) -> list[str]:
    return [t.job_id for t in picked]


@pytest.mark.parametrize(
    ("queues", "slots", "running", "picked"),
    [
        # One key's thousand async jobs (queued first) never starve another key's batch.
        (lambda: [tasks("a", 1000, "job"), tasks("b", 5)], 4, {}, ["a-job-0", "b-line-0", "a-job-1", "b-line-1"]),
        # A key with lines running already waits its turn behind one with none.
        (lambda: [tasks("a", 5), tasks("b", 5)], 2, {"a": 2}, ["b-line-0", "b-line-1"]),
        # Within one key: its jobs first, then its batches in order.
        (lambda: [tasks("a", 1, "job"), tasks("a", 2)], 3, {}, ["a-job-0", "a-line-0", "a-line-1"]),
        # Lines put back for later are not taken before their time.
        (lambda: [tasks("a", 3, not_before=99.0), tasks("b", 1)], 3, {}, ["b-line-0"]),
        # Alone, a key gets every slot.
        (lambda: [tasks("a", 10)], 3, {}, ["a-line-0", "a-line-1", "a-line-2"]),
    ],
)
def test_slots_are_shared_fairly_between_keys(
    queues: Callable[[], list[deque[Task]]], slots: int, running: dict[str, int], picked: list[str]
) -> None:
    assert ids(fair_share(queues(), slots, now=1.0, running=Counter(running))) == picked


class Store:
    def __init__(self) -> None:
        self.moves: list[tuple[str, str, dict[str, object]]] = []

    async def move_batch(self, batch_id: str, status: object, **fields: object) -> bool:
        self.moves.append((batch_id, str(status), fields))
        return True


async def test_a_batch_fails_once_whichever_line_saw_it_first(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    backlog = Backlog(Config(), object(), store, Results(store, "runner-1"))  # type: ignore[arg-type]
    work = BatchWork("batch_1", "alice", "/v1/chat/completions", b"", [])
    backlog.batches[work.id] = work
    with caplog.at_level(logging.ERROR, logger="ssw.batch.results"):
        await asyncio.gather(
            backlog.fail_batch(work, "results_unwritable", "a result could not be written: disk full"),
            backlog.fail_batch(work, "results_unwritable", "a result could not be written: disk full"),
        )
    assert [m[:2] for m in store.moves] == [("batch_1", "failed")]
    assert store.moves[0][2]["errors"] == {
        "object": "list",
        "data": [{"code": "results_unwritable", "message": "a result could not be written: disk full", "line": None}],
    }
    assert [r.getMessage() for r in caplog.records] == [
        "batch batch_1: failed: a result could not be written: disk full"
    ]
    assert work.id not in backlog.batches
