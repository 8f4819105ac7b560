"""What a request must look like before any worker is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssw.common.auth import Forbidden, KeyRing, Unauthorized, digest, new_secret, write_keys
from ssw.common.bodies import parse_body, too_deep
from ssw.common.routes import ROUTES
from ssw.config import Config
from ssw.errors import BadRequest
from ssw.gateway.admission import Admission


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


async def test_the_status_page_is_for_operator_keys_and_the_admin_token(tmp_path: Path) -> None:
    keys, token = tmp_path / "keys.yaml", tmp_path / "admin.token"
    cfg = Config.model_validate({"auth": {"enabled": True, "keys_file": str(keys), "admin_token_file": str(token)}})
    operator, client = new_secret(), new_secret()
    write_keys(keys, {"op": {"sha256": digest(operator), "operator": True}, "c": {"sha256": digest(client)}})
    token.write_text("the-admin-token\n")
    ring = KeyRing(keys)
    ring.reload()
    admission = Admission(cfg, ring)

    def bearer(secret: str) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", b"Bearer " + secret.encode())]

    await admission.operator(bearer(operator))
    await admission.operator(bearer("the-admin-token"))
    with pytest.raises(Forbidden, match="--operator"):
        await admission.operator(bearer(client))
    with pytest.raises(Unauthorized):
        await admission.operator(bearer("the-admin-token-not"))
    with pytest.raises(Unauthorized):
        await admission.operator([])


ADMISSION = Admission(Config(), KeyRing(Path("/nonexistent/keys.yaml")))
ROUTE = {r.path: r for r in ROUTES}
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", {"messages": []}, "non-empty array"),
        ("/v1/chat/completions", {"messages": [{"role": "robot"}]}, "'role' is one of"),
        ("/v1/messages", {"messages": MSG}, "'max_tokens' is required"),
        ("/v1/messages", {"messages": [{"role": "system", "content": "x"}], "max_tokens": 1}, "user, assistant"),
        ("/v1/messages", {"messages": MSG, "max_tokens": 0}, "positive integer"),
        ("/v1/messages/count_tokens", {"messages": "hi"}, "non-empty array"),
        ("/v1/responses", {"input": 3}, "'input' must be"),
        ("/v1/responses", {"input": "x", "max_output_tokens": 9999}, "at most 100"),
        # vLLM would make it the stored response's id: another key's id could be taken over.
        ("/v1/responses", {"input": "x", "request_id": "resp_of_another_key"}, "'request_id' is not accepted"),
        ("/v1/embeddings", {}, "'input' must be"),
        ("/tokenize", {}, "'prompt'"),
        ("/detokenize", {"tokens": [1, "2"]}, "array of integers"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "'stream' must be a boolean"),
    ],
)
def test_each_route_checks_the_fields_ssw_relies_on(path: str, body: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        ADMISSION.validate(body, ROUTE[path], 100)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"messages": MSG, "max_tokens": 5, "system": "be brief"}),
        ("/v1/embeddings", {"messages": MSG}),  # vLLM embeds chat-style too
        ("/tokenize", {"messages": MSG}),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "anything": {"else": 1}}),
    ],
)
def test_valid_requests_pass(path: str, body: dict[str, object]) -> None:
    ADMISSION.validate(body, ROUTE[path], 100)


def test_keys_come_as_a_bearer_token_or_as_x_api_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    cfg = Config.model_validate({"auth": {"enabled": True, "keys_file": str(keys)}})
    secret = new_secret()
    write_keys(keys, {"k": {"sha256": digest(secret)}})
    ring = KeyRing(keys)
    ring.reload()
    admission = Admission(cfg, ring)
    for headers in ([(b"authorization", b"Bearer " + secret.encode())], [(b"x-api-key", secret.encode())]):
        key = admission.authenticate(headers)
        assert key is not None and key.name == "k"
    with pytest.raises(Unauthorized):
        admission.authenticate([(b"x-api-key", b"wrong")])
    with pytest.raises(Unauthorized, match="x-api-key"):
        admission.authenticate([])
