"""What a request must look like before any worker is touched."""

from __future__ import annotations

import json

import pytest

from ssw.admission import parse_body, too_deep
from ssw.errors import BadRequest


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        # orjson refuses past 1024 levels; ssw's own limit comes first.
        (b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nests deeper than 64 levels"),
        (b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", "nests deeper than 64 levels"),
        (b'{"a": ' + b'{"b": ' * 100 + b"1" + b"}" * 100 + b"}", "nests deeper than 64 levels"),
    ],
)
def test_bad_bodies_are_400_whatever_their_shape(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_body(raw, 64)


def test_bodies_within_the_depth_pass_untouched() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert parse_body(json.dumps(body).encode(), 64) == body
    assert not too_deep({"a": [[[1]]]}, 4) and too_deep({"a": [[[[1]]]]}, 4)
