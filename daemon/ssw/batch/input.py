"""A batch's input file, checked whole before anything runs (pure).

Each line is one request as OpenAI's Batch API writes it::

    {"custom_id": "arc-17", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Every line must name the batch's endpoint, a unique custom_id and a body that
the synchronous route would accept (the caller's ``check`` applies the same
admission rules: model known and in the key's scope, capabilities, limits).
Errors carry their 1-based line number, as OpenAI's do, so a 50,000-line file
is fixed in one pass rather than one failed batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson

from ssw.common.bodies import too_deep
from ssw.errors import BadRequest, SswError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID = 512
MAX_ERRORS = 100  # reported per file; the count says how many more there were


@dataclass(frozen=True, slots=True)
class LineError:
    line: int  # 1-based
    code: str
    message: str
    param: str | None = None

    def view(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class Line:
    index: int  # 0-based position among the requests (blank lines are skipped)
    custom_id: str
    model: str  # as resolved when the batch was created
    offset: int  # of the line's bytes in the input file
    length: int


class InvalidInput(BadRequest):
    code = "invalid_batch_input"

    def __init__(self, errors: list[LineError], total: int) -> None:
        shown = "; ".join(f"line {e.line}: {e.message}" for e in errors[:5])
        more = f" (and {total - 5} more errors)" if total > 5 else ""
        super().__init__(f"the input file has {total} invalid lines: {shown}{more}")
        self.errors = errors
        self.param = "input_file_id"
        self.details = [e.view() for e in errors]


def read_lines(
    data: bytes,
    endpoint: str,
    check: Callable[[dict[str, object]], str],
    max_lines: int,
    max_line_bytes: int,
    max_depth: int,
) -> list[Line]:
    """The requests of an input file, in order; InvalidInput naming every bad line.
    ``check(body)`` returns the model the body resolves to, or raises SswError."""
    if endpoint not in ENDPOINTS:
        raise BadRequest(f"'endpoint' must be one of {', '.join(ENDPOINTS)}")
    errors: list[LineError] = []
    total_errors = 0
    lines: list[Line] = []
    seen: set[str] = set()

    def bad(number: int, code: str, message: str, param: str | None = None) -> None:
        nonlocal total_errors
        total_errors += 1
        if len(errors) < MAX_ERRORS:
            errors.append(LineError(number, code, message, param))

    offset = 0
    for number, raw in enumerate(_split(data), start=1):
        start, offset = offset, offset + len(raw)
        text = raw.rstrip(b"\r\n")
        if not text.strip():
            continue
        if len(lines) + total_errors >= max_lines:
            raise BadRequest(f"the input file has more than {max_lines} requests (batch.max_lines)")
        if len(text) > max_line_bytes:
            bad(number, "line_too_large", f"the line exceeds {max_line_bytes} bytes")
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            bad(number, "invalid_json", "not valid JSON")
            continue
        if type(obj) is not dict:
            bad(number, "invalid_request", "each line must be a JSON object")
            continue
        custom_id = obj.get("custom_id")
        if type(custom_id) is not str or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            bad(
                number,
                "invalid_custom_id",
                f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters",
                "custom_id",
            )
            continue
        if custom_id in seen:
            bad(number, "duplicate_custom_id", f"custom_id '{custom_id[:80]}' is used by an earlier line", "custom_id")
            continue
        if obj.get("method") != "POST":
            bad(number, "invalid_method", "'method' must be POST", "method")
            continue
        if obj.get("url") != endpoint:
            bad(number, "mismatched_url", f"'url' must be the batch's endpoint, {endpoint}", "url")
            continue
        body = obj.get("body")
        if type(body) is not dict:
            bad(number, "invalid_body", "'body' must be a JSON object", "body")
            continue
        if too_deep(body, max_depth):
            bad(number, "invalid_body", f"'body' nests deeper than {max_depth} levels", "body")
            continue
        if body.get("stream") is True:
            bad(number, "invalid_body", "a batch request cannot stream", "body.stream")
            continue
        try:
            model = check(body)
        except SswError as exc:
            bad(number, exc.code or "invalid_body", exc.message, "body")
            continue
        seen.add(custom_id)
        lines.append(Line(len(lines), custom_id, model, start, len(raw)))
    if total_errors:
        raise InvalidInput(errors, total_errors)
    if not lines:
        raise BadRequest(
            "the input file holds no requests",
        )
    return lines


def _split(data: bytes) -> Iterable[bytes]:
    """Lines with their endings kept, so that offsets add up."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        yield data[start:end]
        start = end


def line_body(data: bytes, line: Line) -> dict[str, object]:
    """The body of one line of a file that read_lines accepted."""
    obj = orjson.loads(data[line.offset : line.offset + line.length])
    body: dict[str, object] = obj["body"]
    return body
