"""Each load as a span (with ``tracing`` on): it starts when the model's load record
turns to loading, as a child of the request that asked for it (the traceparent the
gateway sent with POST /load), and ends when the record leaves loading (an error
with the reason when it failed). A worker's cold start adds its phases as child
spans (placement, eviction, unit start, process up, engine ready with the canary
inside it: from the marks the load recorded), a wake its own span; a worker that
fails to start, an event. A listener of :class:`~ssw.loader.workers.lifecycle.Lifecycle`: it reads changes,
makes none."""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from ssw.common.tracing import Tracing
from ssw.loader.workers.lifecycle import Change
from ssw.loader.workers.table import PHASES

MAX_PENDING = 1024  # parents noted for loads that never started (a model the load refused)


def ns(wall_s: float) -> int:
    return int(wall_s * 1e9)


class LoadTraces:
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self._parents: dict[str, Context] = {}
        self._spans: dict[str, Span] = {}

    def asked(self, model: str, traceparent: str | None) -> None:
        """A request for the model's load, with its trace context: the next load continues it."""
        if not self.tracing.enabled or model in self._spans:
            return
        ctx = self.tracing.extract(traceparent)
        if ctx is not None:
            if len(self._parents) >= MAX_PENDING:
                self._parents.pop(next(iter(self._parents)))
            self._parents[model] = ctx

    def observe(self, change: Change) -> None:
        if not self.tracing.enabled:
            return
        at = ns(change.at)
        model = change.model
        if change.unit is None:
            if change.state == "loading" and model not in self._spans:
                self._spans[model] = self.tracing.start(
                    f"load {model}", self._parents.pop(model, None), at, attributes={"ssw.model": model}
                )
            elif change.previous == "loading" and change.state != "loading":
                span = self._spans.pop(model, None)
                if span is not None:
                    if change.state != "idle":
                        span.set_status(Status(StatusCode.ERROR, change.reason[:500]))
                    span.end(end_time=at)
            return
        span = self._spans.get(model)
        if span is None:
            return
        if change.marks and change.phases:
            # Each phase from the mark before it to its own (load_phases' steps).
            marks = change.marks
            previous = marks.get("requested")
            for phase, mark in PHASES:
                if previous is None or mark not in marks:
                    break
                self.tracing.span_between(phase, span, ns(previous), ns(marks[mark]), {"ssw.unit": change.unit})
                previous = marks[mark]
            if "answered" in marks and "healthy" in marks:
                # Inside engine_ready: the engine answered; its answer to the fixed prompt is checked.
                unit = {"ssw.unit": change.unit}
                self.tracing.span_between("canary", span, ns(marks["answered"]), ns(marks["healthy"]), unit)
        elif change.previous == "waking" and change.state == "ready":
            attributes = {"ssw.unit": change.unit, "ssw.sleep_level": change.sleep_level}
            self.tracing.span_between("wake", span, at - int(change.held_s * 1e9), at, attributes)
        elif change.state == "failed":
            span.add_event("worker failed", {"ssw.unit": change.unit, "reason": change.reason[:500]}, at)
