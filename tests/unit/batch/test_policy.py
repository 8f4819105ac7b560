from __future__ import annotations

import pytest

from ssw.batch.policy import Act, ModelState, View, decide

READY, LOADING, IDLE, GONE, FAILING = (
    ModelState.READY,
    ModelState.LOADING,
    ModelState.IDLE,
    ModelState.GONE,
    ModelState.FAILING,
)


@pytest.mark.parametrize(
    ("view", "act", "count"),
    [
        (View(READY, pending=10, running=0, interactive_queued=0), Act.RUN, 4),
        (View(READY, pending=2, running=0, interactive_queued=0), Act.RUN, 2),
        (View(READY, pending=10, running=3, interactive_queued=0), Act.RUN, 1),
        (View(READY, pending=10, running=4, interactive_queued=0), Act.WAIT, 0),
        # Interactive requests queue at the workers: nothing new starts.
        (View(READY, pending=10, running=0, interactive_queued=1), Act.WAIT, 0),
        (View(READY, pending=10, running=2, interactive_queued=5), Act.WAIT, 0),
        (View(READY, pending=0, running=0, interactive_queued=0), Act.WAIT, 0),
        (View(LOADING, pending=10, running=0, interactive_queued=0), Act.WAIT, 0),
        (View(FAILING, pending=10, running=0, interactive_queued=0), Act.WAIT, 0),
        (View(IDLE, pending=10, running=0, interactive_queued=0, now=100.0), Act.LOAD, 0),
        # A protected load was refused: not asked again before its time.
        (View(IDLE, pending=10, running=0, interactive_queued=0, refused_until=110.0, now=100.0), Act.WAIT, 0),
        (View(IDLE, pending=10, running=0, interactive_queued=0, refused_until=90.0, now=100.0), Act.LOAD, 0),
        # Lines still running on a worker that went away come back first.
        (View(IDLE, pending=10, running=1, interactive_queued=0), Act.WAIT, 0),
        (View(GONE, pending=3, running=0, interactive_queued=0), Act.FAIL, 0),
        (View(GONE, pending=0, running=0, interactive_queued=0), Act.WAIT, 0),
    ],
)
def test_decide(view: View, act: Act, count: int) -> None:
    decision = decide(view, concurrency=4)
    assert (decision.act, decision.count) == (act, count)
    assert decision.act is Act.RUN or decision.act is Act.LOAD or decision.why
