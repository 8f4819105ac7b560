"""Traces, received for real: an OTLP/HTTP receiver in the test decodes what the
gateway and the loader export (real systemd, the fake engine). A request that waits
for a cold model is one trace, continuing the client's traceparent: the gateway's
request span with its admission, its wait (the load's phases as events) and its relay
(the first token as an event); the loader's load span with its phases as children;
and the worker got the trace context with the request. A load that fails is a span
with an error status."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, free_port, http, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
MODELS = {
    "cold": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "1"}},
    "broken": {"path": "fake-broken", "vram_gb": 1, "env": {"SSW_FAKE_FAIL": "exit-on-start"}},
}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: every span it is sent, decoded, with its service."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    with self.lock:
                        self.spans.append(
                            {
                                "service": resource.get("service.name"),
                                "name": s.name,
                                "trace": s.trace_id.hex(),
                                "id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                                "events": [e.name for e in s.events],
                                "attributes": {a.key: a.value for a in s.attributes},
                                "status": s.status.code,
                                "message": s.status.message,
                            }
                        )

    def where(self, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if all(s[k] == v for k, v in match.items())]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path, receiver: Receiver) -> Iterator[Stack]:
    # worker_spans: the workers are told the endpoint too (vLLM's own spans; the fake ignores it).
    extra = {"tracing": {"otlp_endpoint": receiver.url, "worker_spans": True}}
    s = start_stack(sysbox, WORK_ROOT / f"tracing-{id(sysbox)}", models_root, MODELS, "fake", extra)
    yield s
    stop_stack(s)


def test_a_request_held_for_a_load_is_one_trace_from_the_client_to_the_worker(stack: Stack, receiver: Receiver) -> None:
    stack.unload("cold")
    status, _, body = http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": "cold", "messages": CHAT, "max_tokens": 3, "stream": True},
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "X-SSW-Wait": "true"},
        timeout=120,
    )
    assert status == 200 and body.rstrip().endswith("data: [DONE]")

    def spans() -> dict[str, dict[str, Any]] | None:
        found = {s["name"]: s for s in receiver.where(trace=CLIENT_TRACE)}
        wanted = {"POST /v1/chat/completions", "admission", "wait for the model", "relay", "load cold", "engine_ready"}
        return found if wanted <= set(found) else None

    found = wait_for(spans, 20, "the request's and the load's spans")
    root = found["POST /v1/chat/completions"]
    assert root["service"] == "ssw-gateway" and root["parent"] == CLIENT_SPAN
    assert root["attributes"]["ssw.model"].string_value == "cold"
    assert root["attributes"]["http.response.status_code"].int_value == 200
    for child in ("admission", "wait for the model", "relay"):
        assert found[child]["parent"] == root["id"] and root["start"] <= found[child]["start"] <= root["end"]
    wait = found["wait for the model"]
    # The load's phases, as the gateway saw them happen while the request waited.
    assert {"worker unit started", "worker process up", "engine ready"} <= set(wait["events"]), wait["events"]
    assert "first token" in found["relay"]["events"] and "stream end" in found["relay"]["events"]
    assert found["admission"]["end"] <= wait["start"] <= wait["end"] <= found["relay"]["start"]
    # The loader's load continues the request's trace, its phases as child spans.
    load = found["load cold"]
    assert load["service"] == "ssw-loader" and load["parent"] == root["id"] and load["status"] != 2
    phases = receiver.where(trace=CLIENT_TRACE, parent=load["id"])
    assert {"placement", "eviction", "unit_start", "process_up", "engine_ready", "canary"} <= {
        s["name"] for s in phases
    }
    engine, canary = found["engine_ready"], found["canary"]
    assert engine["end"] - engine["start"] >= 0.9e9  # the fake engine's 1 s load
    assert engine["start"] <= canary["start"] <= canary["end"] == engine["end"]  # its known-answer check, last
    # The worker was sent the same trace (vLLM continues it with its own spans).
    worker = next(w for w in stack.status()["workers"] if w["model"] == "cold")
    sent = worker_http(worker["socket"], "GET", "/ssw-fake/traceparents")[1]
    assert any(tp.split("-")[1] == CLIENT_TRACE for tp in sent), sent


def test_a_request_without_a_traceparent_starts_its_own_trace(stack: Stack, receiver: Receiver) -> None:
    stack.load("cold")
    before = {s["trace"] for s in receiver.where(name="POST /v1/chat/completions")}
    status, _, _ = http(
        "POST", stack.public + "/v1/chat/completions", {"model": "cold", "messages": CHAT, "max_tokens": 2}
    )
    assert status == 200

    def new_trace() -> list[dict[str, Any]]:
        return [s for s in receiver.where(name="POST /v1/chat/completions") if s["trace"] not in before]

    root = wait_for(new_trace, 20, "a new trace")[0]
    assert root["parent"] == "" and len(root["trace"]) == 32
    children = {s["name"] for s in receiver.where(trace=root["trace"], parent=root["id"])}
    assert {"admission", "relay"} <= children and "wait for the model" not in children  # it was ready


def test_a_failed_load_is_a_span_with_its_error(stack: Stack, receiver: Receiver) -> None:
    status, _, _ = http("POST", stack.admin + "/load", {"model": "broken"}, timeout=120)
    assert status >= 500
    span = wait_for(lambda: receiver.where(name="load broken"), 20, "the failed load's span")[0]
    assert span["status"] == 2 and "start_failed" in span["message"]  # STATUS_CODE_ERROR
    assert "worker failed" in span["events"]  # its worker's end, as it happened


def test_with_worker_spans_a_worker_reaches_the_endpoint_and_nothing_else(stack: Stack) -> None:
    worker = next(w for w in stack.load("cold")["workers"])
    props = stack.unit_show(worker["unit"], "PrivateNetwork", "IPAddressAllow", "IPAddressDeny", "ExecStart")
    assert props["PrivateNetwork"] == "no"
    assert set(props["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}
    # The receiver's 127.0.0.1 is inside loopback's range, which systemd keeps alone; another
    # endpoint's address is added to the list (tests/unit/loader/systemd/test_engine.py).
    assert set(props["IPAddressAllow"].split()) == {"127.0.0.0/8", "::1/128"}
    assert "--otlp-traces-endpoint" in props["ExecStart"]
