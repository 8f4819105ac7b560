"""OpenTelemetry for one role (``tracing`` in config.yaml): off by default, and then
every call is the API's no-op; on, spans go to an OTLP/HTTP endpoint from the SDK's
batch processor (its own thread: no export ever waits on the event loop).

Spans are made where the facts are known: a request's root span lives from its
arrival to its end; its children (admission, waiting, relay) are written when it
ends, from the times the request recorded (``start_ns``/``end_ns``), so the relay's
path pays one span, not four. Trace context crosses every hop as W3C
``traceparent``: client → gateway → another host's gateway → worker (vLLM), and
gateway → loader for the load a request waits for."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ssw import __version__
from ssw.config import TracingSettings

log = logging.getLogger(__name__)
PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = b"traceparent"
MAX_TRACEPARENT = 128  # 55 bytes in version 00; anything far longer is not one


class Tracing:
    def __init__(self, settings: TracingSettings, service: str, host: str | None = None) -> None:
        self.enabled = settings.otlp_endpoint is not None
        self._provider: Any = None
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        # The SDK only where tracing is on: a host without it never imports it.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        attributes = {"service.name": service, "service.version": __version__}
        if host:
            attributes["host.name"] = host
        provider = TracerProvider(
            resource=Resource.create(attributes), sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio))
        )
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, timeout=settings.export_timeout_s)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self._provider = provider
        self.tracer = provider.get_tracer("ssw", __version__)
        log.info("tracing: %s's spans go to %s", service, settings.otlp_endpoint)

    def close(self) -> None:
        """Flush what is pending (blocking, up to the exporter's timeout: call off the loop)."""
        if self._provider is not None:
            self._provider.shutdown()

    def start(
        self,
        name: str,
        parent: Context | Span | None = None,
        start_ns: int | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> Span:
        if isinstance(parent, Span):
            parent = trace.set_span_in_context(parent)
        return self.tracer.start_span(
            name, context=parent, kind=kind, attributes=attributes, start_time=start_ns, record_exception=False
        )

    def span_between(
        self,
        name: str,
        parent: Span,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        events: Iterable[tuple[str, int]] = (),
        error: str | None = None,
    ) -> None:
        """A span that already happened (its times recorded meanwhile), with its events."""
        span = self.start(name, parent, start_ns, attributes=attributes)
        for event, at_ns in events:
            span.add_event(event, timestamp=at_ns)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=end_ns)

    @staticmethod
    def extract(traceparent: bytes | str | None) -> Context | None:
        """The caller's trace context from its traceparent (None: none, or not a valid one)."""
        if not traceparent or len(traceparent) > MAX_TRACEPARENT:
            return None
        value = traceparent.decode("latin-1") if isinstance(traceparent, bytes) else traceparent
        ctx = PROPAGATOR.extract({"traceparent": value})
        return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None

    @staticmethod
    def traceparent(span: Span) -> bytes | None:
        """The header that makes the next hop's spans children of ``span`` (None: not recording)."""
        if not span.get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        value = carrier.get("traceparent")
        return value.encode() if value else None


def wall_ns(perf: float, perf0: float, wall0: float) -> int:
    """A perf_counter() reading as wall time in ns, given one moment known in both."""
    return int((wall0 + (perf - perf0)) * 1e9)
