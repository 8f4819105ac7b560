"""The relay's pure parts: errors from workers in the envelope, and stream inspection."""

from __future__ import annotations

import json

import pytest

from ssw.accounting import Exchange
from ssw.relay import _inspect, wrap_worker_error


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
