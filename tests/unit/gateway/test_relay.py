"""The relay's pure parts: errors from workers in the envelope, stream inspection, and the
order in which a request tries the replicas."""

from __future__ import annotations

import json

import pytest

from ssw.common.contract import WorkerView
from ssw.common.routes import Dialect
from ssw.common.states import WorkerState
from ssw.config import Config
from ssw.gateway.accounting import Exchange
from ssw.gateway.relay import Relay, _inspect, wrap_worker_error


@pytest.mark.parametrize(
    ("status", "body", "message", "type_"),
    [
        # vLLM 0.32: an integer code and no source.
        (
            400,
            b'{"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": null, "code": 400}}',
            "max_tokens is too large",
            "BadRequestError",
        ),
        (
            500,
            b'{"object": "error", "message": "engine dead", "type": "InternalServerError", "code": 500}',
            "engine dead",
            "InternalServerError",
        ),
        (422, b'{"detail": "Field required"}', "Field required", "worker_error"),
        (502, b"Bad Gateway", "Bad Gateway", "worker_error"),
        (500, b"", "the worker answered 500", "worker_error"),
    ],
)
def test_worker_errors_keep_their_message_and_say_where_they_come_from(
    status: int, body: bytes, message: str, type_: str
) -> None:
    wrapped, _ = wrap_worker_error(status, body)
    error = json.loads(wrapped)["error"]
    assert error["message"] == message and error["type"] == type_
    assert error["source"] == "worker"
    assert error["code"] is None or isinstance(error["code"], str)


def chunk(obj: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_the_first_token_is_timed_and_the_usage_chunk_taken_out_when_only_ssw_asked() -> None:
    ex = Exchange(stream=True, strip_usage=True)
    role = chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    token = chunk({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    usage = chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert _inspect(role, ex) == role and ex.ttft_s is None
    assert _inspect(token + token, ex) == token + token and ex.ttft_s is not None
    assert _inspect(usage + b"data: [DONE]\n\n", ex) == b"data: [DONE]\n\n"
    assert (ex.prompt_tokens, ex.completion_tokens) == (5, 2)


def test_a_client_that_asked_for_usage_keeps_it() -> None:
    ex = Exchange(stream=True, strip_usage=False, ttft_s=0.1)
    usage = chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert _inspect(usage, ex) == usage and ex.completion_tokens == 2


def _events(*pairs: tuple[str | None, dict[str, object]]) -> bytes:
    out = b""
    for name, data in pairs:
        out += (f"event: {name}\n".encode() if name else b"") + b"data: " + json.dumps(data).encode() + b"\n\n"
    return out


def test_a_responses_stream_gives_its_id_usage_and_first_token() -> None:
    ex = Exchange(capture_id=True)
    created = {"type": "response.created", "response": {"id": "resp_1", "usage": None}}
    delta = {"type": "response.output_text.delta", "delta": "hi"}
    done = {
        "type": "response.completed",
        "response": {"id": "resp_1", "usage": {"input_tokens": 7, "output_tokens": 3}},
    }
    events = _events(("response.created", created), ("response.output_text.delta", delta), ("response.completed", done))
    assert _inspect(events, ex) == events  # nothing taken out
    assert ex.response_id == "resp_1" and ex.ttft_s is not None
    assert (ex.prompt_tokens, ex.completion_tokens) == (7, 3)


def test_an_anthropic_stream_adds_up_its_usage_across_events() -> None:
    ex = Exchange()
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}
    _inspect(_events(("message_start", start)), ex)
    assert ex.ttft_s is None and ex.prompt_tokens == 12
    _inspect(_events(("content_block_delta", delta), ("message_delta", end)), ex)
    assert ex.ttft_s is not None and (ex.prompt_tokens, ex.completion_tokens) == (12, 9)


def test_worker_errors_on_the_anthropic_route_take_its_shape() -> None:
    vllm = json.dumps({"error": {"message": "bad field", "type": "BadRequestError", "code": 400}}).encode()
    data, _ = wrap_worker_error(400, vllm, Dialect.ANTHROPIC)
    assert json.loads(data) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bad field", "source": "worker"},
    }
    data, _ = wrap_worker_error(503, b"", Dialect.ANTHROPIC)
    assert json.loads(data)["error"]["type"] == "overloaded_error"  # the SDK retries it


async def test_realtime_requests_go_to_the_least_busy_replica_whatever_the_routing() -> None:
    relay = Relay(Config(), lambda unit, adapter, interactive: None)  # gateway.routing: round_robin
    workers = [
        WorkerView(
            unit=f"ssw-worker@m:{i}.service", model="m", replica=i, state=WorkerState.READY, gpus=[0], socket="/s"
        )
        for i in (1, 2, 3)
    ]
    for unit, priority, n in ((workers[0].unit, "interactive", 5), (workers[2].unit, "batch", 9)):
        for _ in range(n):
            await relay.inflight.enter(unit, "m", priority)
    for _ in range(3):  # the rotation moves on; the least busy stays first
        assert relay.order("m", workers, "realtime")[0] is workers[1]
    firsts = {relay.order("m", workers, "interactive")[0].unit for _ in range(3)}
    assert firsts == {w.unit for w in workers}  # round-robin for the others
    await relay.pool.close()
