"""Request bodies as JSON objects, checked for shape and nesting: what the gateway's
routes and the batch tier's input lines agree on before anything reads a field."""

from __future__ import annotations

from typing import Any

import orjson

from ssw.errors import BadRequest


def too_deep(value: Any, limit: int) -> bool:
    """Whether JSON containers nest deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        obj, depth = stack.pop()
        children = obj.values() if type(obj) is dict else obj
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The request body as a JSON object; BadRequest for anything else."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            raise BadRequest(f"the request body nests deeper than {max_depth} levels") from None
        raise BadRequest("the request body is not valid JSON") from None
    if type(body) is not dict:
        raise BadRequest("the request body must be a JSON object")
    if too_deep(body, max_depth):
        raise BadRequest(f"the request body nests deeper than {max_depth} levels")
    return body
