from __future__ import annotations

from ssw.batch.states import (
    BATCH_FINAL,
    BATCH_MOVES,
    BATCH_STAMPS,
    JOB_FINAL,
    JOB_MOVES,
    BatchStatus,
    JobStatus,
)


def reachable(moves: dict, start: object) -> set[object]:
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for target, sources in moves.items():
            if state in sources and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_batch_state_is_reachable_and_final_states_are_final() -> None:
    assert reachable(BATCH_MOVES, BatchStatus.VALIDATING) == set(BatchStatus)
    for sources in BATCH_MOVES.values():
        assert not sources & BATCH_FINAL
    # Each state OpenAI's Batch object stamps has its stamp.
    assert set(BATCH_STAMPS) == set(BatchStatus) - {BatchStatus.VALIDATING}


def test_every_job_state_is_reachable_and_final_states_are_final() -> None:
    assert reachable(JOB_MOVES, JobStatus.QUEUED) == set(JobStatus)
    for sources in JOB_MOVES.values():
        assert not sources & JOB_FINAL


def test_a_cancel_cannot_overtake_a_finished_batch() -> None:
    assert BatchStatus.COMPLETED not in BATCH_MOVES[BatchStatus.CANCELLING]
    assert BatchStatus.FINALIZING not in BATCH_MOVES[BatchStatus.CANCELLING]
