"""Model load records: the one place they change."""

from __future__ import annotations

import time

import pytest

from ssw.common.states import IllegalTransition, LoadState
from ssw.loader.workers.loads import LoadBook


def test_a_record_moves_along_the_table_and_publishes() -> None:
    changes: list[int] = []
    book = LoadBook(lambda: changes.append(1))
    rec = book.get("m")
    assert rec.state is LoadState.IDLE and book.view("m").state is LoadState.IDLE
    book.move(rec, LoadState.LOADING, "requested")
    deadline = time.time() + 5
    book.move(rec, LoadState.BACKING_OFF, "retry 1 in 5.0 s", deadline)
    view = book.view("m")
    assert (view.state, view.reason, view.deadline) == (LoadState.BACKING_OFF, "retry 1 in 5.0 s", round(deadline, 3))
    with pytest.raises(IllegalTransition):
        book.move(rec, LoadState.COOLING_DOWN, "nope")
    assert len(changes) == 2


def test_a_cooldown_ends_by_itself_at_its_deadline() -> None:
    book = LoadBook(lambda: None)
    rec = book.get("m")
    book.move(rec, LoadState.COOLING_DOWN, "its load failed", time.time() - 0.1)
    assert book.get("m").state is LoadState.IDLE


def test_a_model_never_loaded_has_an_empty_record_and_none_is_created_for_it() -> None:
    book = LoadBook(lambda: None)
    assert book.view("never").state is LoadState.IDLE
    assert book.records() == []
