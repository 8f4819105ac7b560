"""Deadlines for a first token, on real systemd with the fake engine: a realtime
request for a model that cannot be ready in time is answered at once by a ready
fallback (and the load goes on), or gets a 503 with the load's ETA; a request's own
X-SSW-Deadline-Ms wins; a malformed one is a 400 that loads nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
MODELS = {
    "cold": {"path": "fake-a", "vram_gb": 2, "fallbacks": ["warm"], "env": {"SSW_FAKE_LOAD_DELAY": "2"}},
    "alone": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "2"}},
    "warm": {"path": "fake-b", "vram_gb": 2, "pinned": True},
}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path) -> Iterator[Stack]:
    extra = {"gateway": {"deadlines_ms": {"realtime": 800}}}
    s = start_stack(sysbox, WORK_ROOT / f"deadlines-{id(sysbox)}", models_root, MODELS, "fake", extra)
    wait_for(lambda: any(w["model"] == "warm" and w["state"] == "ready" for w in s.status()["workers"]), 60, "warm")
    yield s
    stop_stack(s)


def chat(stack: Stack, model: str, **headers: str) -> tuple[int, dict[str, str], object, float]:
    t0 = time.monotonic()
    request = {"model": model, "messages": CHAT}
    status, hdrs, answer = http("POST", stack.public + "/v1/chat/completions", request, headers)
    return status, hdrs, answer, time.monotonic() - t0


def ready(stack: Stack, model: str) -> bool:
    return any(w["model"] == model and w["state"] == "ready" for w in stack.status()["workers"])


def test_a_realtime_request_that_cannot_wait_is_served_by_a_ready_fallback_and_the_load_goes_on(
    stack: Stack,
) -> None:
    stack.unload("cold")
    status, headers, body, took = chat(stack, "cold", **{"X-SSW-Priority": "realtime"})
    assert status == 200 and isinstance(body, dict) and body["model"] == "warm", body
    assert headers["x-ssw-fallback-from"] == "cold"
    assert took < 2  # not held for the load (2 s at the least)
    wait_for(lambda: ready(stack, "cold"), 30, "cold's load, started by the realtime request")
    status, headers, body, _ = chat(stack, "cold", **{"X-SSW-Priority": "realtime"})
    assert status == 200 and isinstance(body, dict) and body["model"] == "cold"  # ready now: itself
    # An interactive request has no deadline by default: it is held for the load.
    stack.unload("cold")
    status, _, body, took = chat(stack, "cold")
    assert status == 200 and isinstance(body, dict) and body["model"] == "cold" and took >= 1.5


def test_without_a_fallback_the_answer_is_a_503_with_the_eta_at_once(stack: Stack) -> None:
    stack.unload("alone")
    status, headers, body, took = chat(stack, "alone", **{"X-SSW-Deadline-Ms": "300"})
    assert status == 503 and took < 2, body
    assert isinstance(body, dict) and body["error"]["code"] == "deadline_exceeded"
    assert "deadline of 300 ms" in body["error"]["message"]
    assert int(headers["retry-after"]) >= 1
    wait_for(lambda: ready(stack, "alone"), 30, "alone's load, which went on")
    load_s = stack.status()["models"]["alone"]["load_seconds"]
    stack.unload("alone")
    # Its load time is known now: the ETA in Retry-After is that, not a guess.
    status, headers, _, _ = chat(stack, "alone", **{"X-SSW-Deadline-Ms": "300"})
    assert status == 503 and 1 <= int(headers["retry-after"]) <= round(load_s) + 1
    # A deadline the measured load fits in is waited for.
    wait_for(lambda: ready(stack, "alone"), 30, "alone's second load")
    stack.unload("alone")
    status, _, body, _ = chat(stack, "alone", **{"X-SSW-Deadline-Ms": str(int(load_s * 1000) + 20_000)})
    assert status == 200 and isinstance(body, dict) and body["model"] == "alone"


@pytest.mark.parametrize("value", ["soon", "0", "-5", "600001", "1.5"])
def test_a_malformed_deadline_is_a_400_that_loads_nothing(stack: Stack, value: str) -> None:
    stack.unload("alone")
    status, _, body, _ = chat(stack, "alone", **{"X-SSW-Deadline-Ms": value})
    assert status == 400 and isinstance(body, dict) and "X-SSW-Deadline-Ms" in body["error"]["message"]
    assert stack.status()["models"]["alone"]["load"]["state"] == "idle"
    assert not any(w["model"] == "alone" for w in stack.status()["workers"])
