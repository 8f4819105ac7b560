"""A request as spans (with ``tracing`` on): its root span starts when it arrives
(a child of the client's traceparent, if any) and its context goes on to the worker,
another host's gateway and the loader; the rest is written when the request has been
answered, off its path (the accounting's batch), from the times it recorded:
admission, the wait for its model with the load's phases as events, and the relay
from the request sent to its end, with the first token as an event."""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from ssw.common.routes import Route
from ssw.common.tracing import TRACEPARENT, Tracing, wall_ns
from ssw.gateway.accounting import Exchange

# Finding a ready worker takes microseconds; a request that took this long was held.
HELD_S = 0.001
# A worker's load marks, as the wait span's events.
MARK_EVENTS = {
    "placed": "load placed",
    "evicted": "room made (evictions done)",
    "unit_started": "worker unit started",
    "bound": "worker process up",
    "healthy": "engine ready",
}


def begin(tracing: Tracing, scope: dict[str, Any], route: Route, ex: Exchange) -> None:
    if not tracing.enabled:
        return
    parent = tracing.extract(next((v for k, v in scope["headers"] if k == TRACEPARENT), None))
    span = tracing.start(
        f"{route.method} {route.path}",
        parent,
        int(ex.started * 1e9),  # its children's times count from the same moment
        kind=SpanKind.SERVER,
        attributes={"http.request.method": route.method, "http.route": route.path},
    )
    ex.span = span
    # (an unsampled trace's context goes on too: the next hop then drops it as well)
    ex.traceparent = Tracing.traceparent(span)


def finish(tracing: Tracing, ex: Exchange) -> None:
    span = ex.span
    if span is None:
        return
    ex.span = None
    if not span.is_recording():
        return  # not sampled: nothing of it is kept

    def at(perf: float) -> int:
        return wall_ns(perf, ex.t0, ex.started)

    end = at(ex.t0 + ex.latency_s)
    common = {"ssw.model": ex.model, "ssw.priority": ex.priority}
    if ex.admitted_at:
        tracing.span_between("admission", span, at(ex.t0), at(ex.admitted_at), {"ssw.key": ex.key})
    if ex.wait_from is not None and ex.waited_s >= HELD_S:
        start, stop = at(ex.wait_from), at(ex.wait_from + ex.waited_s)
        events = sorted(
            (MARK_EVENTS[mark], int(t * 1e9))
            for mark, t in (ex.load_marks or {}).items()
            if mark in MARK_EVENTS and start <= int(t * 1e9) <= stop
        )
        tracing.span_between("wait for the model", span, start, stop, common, events)
    if ex.sent_at is not None:
        events = [("first token", at(ex.t0 + ex.ttft_s))] if ex.ttft_s is not None else []
        events.append(("stream end" if ex.stream else "answer end", end))
        error = ex.error if ex.status >= 500 else None
        tracing.span_between("relay", span, at(ex.sent_at), end, {**common, "ssw.worker": ex.worker}, events, error)
    span.set_attributes({**common, "http.response.status_code": ex.status, "ssw.stream": ex.stream})
    if ex.status >= 500 or ex.status == 0:
        span.set_status(Status(StatusCode.ERROR, ex.error or "no answer"))
    span.end(end_time=end)
