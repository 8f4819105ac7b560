"""The states of a batch (OpenAI's Batch API names them) and of an async job,
with the moves allowed between them (pure). The store makes each move in one
atomic Redis step that checks the state it leaves, so that the runner and an
API process cancelling at the same moment can never both win."""

from __future__ import annotations

import enum


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


B = BatchStatus
# target -> the states it may be entered from
BATCH_MOVES: dict[BatchStatus, frozenset[BatchStatus]] = {
    B.IN_PROGRESS: frozenset({B.VALIDATING}),
    # Finalizing writes the output files: once every line is done, when the
    # window closes (expired), or when a cancel has let its lines in flight end.
    B.FINALIZING: frozenset({B.IN_PROGRESS, B.CANCELLING}),
    B.COMPLETED: frozenset({B.FINALIZING}),
    B.EXPIRED: frozenset({B.FINALIZING}),
    B.CANCELLED: frozenset({B.FINALIZING}),
    B.FAILED: frozenset({B.VALIDATING, B.IN_PROGRESS, B.FINALIZING}),
    B.CANCELLING: frozenset({B.VALIDATING, B.IN_PROGRESS}),
}
BATCH_FINAL = frozenset({B.COMPLETED, B.FAILED, B.EXPIRED, B.CANCELLED})
# The timestamp field OpenAI's Batch object sets on entering each state.
BATCH_STAMPS: dict[BatchStatus, str] = {
    B.IN_PROGRESS: "in_progress_at",
    B.FINALIZING: "finalizing_at",
    B.COMPLETED: "completed_at",
    B.FAILED: "failed_at",
    B.EXPIRED: "expired_at",
    B.CANCELLING: "cancelling_at",
    B.CANCELLED: "cancelled_at",
}

J = JobStatus
JOB_MOVES: dict[JobStatus, frozenset[JobStatus]] = {
    J.RUNNING: frozenset({J.QUEUED}),
    # A job whose try was cut short (the runner died, the model went away) waits again.
    J.QUEUED: frozenset({J.RUNNING}),
    J.SUCCEEDED: frozenset({J.RUNNING}),
    J.FAILED: frozenset({J.QUEUED, J.RUNNING}),
    J.CANCELLED: frozenset({J.QUEUED, J.RUNNING}),
    J.EXPIRED: frozenset({J.QUEUED, J.RUNNING}),
}
JOB_FINAL = frozenset({J.SUCCEEDED, J.FAILED, J.CANCELLED, J.EXPIRED})
JOB_STAMPS: dict[JobStatus, str] = {
    J.RUNNING: "started_at",
    J.SUCCEEDED: "completed_at",
    J.FAILED: "completed_at",
    J.CANCELLED: "completed_at",
    J.EXPIRED: "completed_at",
}


def batch_sources(target: BatchStatus) -> frozenset[BatchStatus]:
    return BATCH_MOVES.get(target, frozenset())


def job_sources(target: JobStatus) -> frozenset[JobStatus]:
    return JOB_MOVES.get(target, frozenset())
