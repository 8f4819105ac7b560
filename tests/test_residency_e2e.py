"""No thrashing, on real systemd with the fake engine: with placement.min_residency_s,
a model that just became ready is not evicted for another model's interactive
request (the load waits for the residency to end, placement.swap_wait_s at most:
here less, so the request gets a 503 saying why, and the resident keeps serving);
a realtime request may have the room when nothing else can make it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
MODELS = {
    "turn-a": {"path": "m", "vram_gb": 6, "gpus": [0]},
    "turn-b": {"path": "m", "vram_gb": 6, "gpus": [0]},
}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"residency-models-{id(sysbox)}"
    make_model_dir(models_dir / "m", QWEN2_CONFIG)
    extra = {
        "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}]},
        "placement": {"runtime_overhead_gb": 0, "min_residency_s": 600, "swap_wait_s": 2},
    }
    s = start_stack(sysbox, WORK_ROOT / f"residency-{id(sysbox)}", models_dir, MODELS, "fake", extra)
    yield s
    stop_stack(s)


def chat(stack: Stack, model: str, priority: str) -> tuple[int, dict]:
    body = {"model": model, "messages": CHAT, "max_tokens": 2}
    status, _, answer = http(
        "POST", stack.public + "/v1/chat/completions", body, {"X-SSW-Priority": priority}, timeout=60
    )
    return status, answer


def ready(stack: Stack) -> set[str]:
    return {w["model"] for w in stack.status()["workers"] if w["state"] == "ready"}


def test_a_model_just_loaded_is_not_evicted_for_an_interactive_request_but_is_for_a_realtime_one(
    stack: Stack,
) -> None:
    stack.unload("turn-b")
    stack.load("turn-a")
    status, body = chat(stack, "turn-b", "interactive")
    assert status == 503 and body["error"]["code"] == "no_capacity", body
    assert "became ready less than placement.min_residency_s ago" in body["error"]["message"]
    assert ready(stack) == {"turn-a"}  # still serving: no swap
    assert chat(stack, "turn-a", "interactive")[0] == 200
    # A realtime request may have the room: nothing else can make it.
    status, body = chat(stack, "turn-b", "realtime")
    assert status == 200 and body["model"] == "turn-b", body
    assert ready(stack) == {"turn-b"}
    # And now turn-b is the young one: turn-a's interactive request does not swap back.
    status, body = chat(stack, "turn-a", "interactive")
    assert status == 503 and ready(stack) == {"turn-b"}
