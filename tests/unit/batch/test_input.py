from __future__ import annotations

import json
from typing import Any

import pytest

from ssw.batch.input import InvalidInput, line_body, read_lines
from ssw.errors import BadRequest, ModelNotFound

ENDPOINT = "/v1/chat/completions"


def check(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model == "alias":
        return "real"
    if model not in ("real", "other"):
        raise ModelNotFound(str(model), ["real"])
    return str(model)


def line(custom_id: Any = "a", **over: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": "real", "messages": []},
        **over,
    }


def data(*lines: Any) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def read(raw: bytes, max_lines: int = 100, max_line: int = 10_000) -> list[Any]:
    return read_lines(raw, ENDPOINT, check, max_lines, max_line, 8)


def test_lines_in_order_with_offsets_and_resolved_models() -> None:
    raw = data(line("a"), b"", line("b", body={"model": "alias", "x": 1}))
    lines = read(raw)
    assert [(x.index, x.custom_id, x.model) for x in lines] == [(0, "a", "real"), (1, "b", "real")]
    assert line_body(raw, lines[1]) == {"model": "alias", "x": 1}


def test_a_last_line_without_newline_counts() -> None:
    raw = data(line("a")) + json.dumps(line("b")).encode()
    assert [x.custom_id for x in read(raw)] == ["a", "b"]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (line(""), "invalid_custom_id"),
        (line(7), "invalid_custom_id"),
        (line("x" * 600), "invalid_custom_id"),
        (line("a"), "duplicate_custom_id"),
        (line("z", method="GET"), "invalid_method"),
        (line("z", url="/v1/embeddings"), "mismatched_url"),
        (line("z", body=[]), "invalid_body"),
        (line("z", body={"model": "real", "stream": True}), "invalid_body"),
        (line("z", body={"model": "real", "a": [[[[[[[[[[1]]]]]]]]]]}), "invalid_body"),
        (line("z", body={"model": "nope"}), "model_not_found"),
    ],
)
def test_each_bad_line_is_named_by_its_number(bad: Any, code: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        read(data(line("a"), bad))
    assert [(e.line, e.code) for e in caught.value.errors] == [(2, code)]
    assert caught.value.status == 400 and caught.value.param == "input_file_id"
    assert caught.value.details == [e.view() for e in caught.value.errors]


def test_every_bad_line_is_reported_at_once() -> None:
    with pytest.raises(InvalidInput) as caught:
        read(data(b"x", line("a"), b"y", line("a")))
    assert [e.line for e in caught.value.errors] == [1, 3, 4]
    assert "3 invalid lines" in caught.value.message


@pytest.mark.parametrize(
    ("raw", "limit", "message"),
    [
        (b"", 10, "no requests"),
        (b"\n\n", 10, "no requests"),
        (data(line("a"), line("b"), line("c")), 2, "more than 2"),
    ],
)
def test_file_limits(raw: bytes, limit: int, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        read(raw, max_lines=limit)


def test_a_line_over_the_size_limit() -> None:
    with pytest.raises(InvalidInput) as caught:
        read(data(line("a", body={"model": "real", "pad": "x" * 500})), max_line=200)
    assert caught.value.errors[0].code == "line_too_large"


def test_an_endpoint_batches_do_not_take() -> None:
    with pytest.raises(BadRequest, match="endpoint"):
        read_lines(data(line("a")), "/v1/audio/transcriptions", check, 10, 1000, 8)
