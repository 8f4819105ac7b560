"""The allowlist of inference routes: what matches, what never does."""

from __future__ import annotations

import pytest

from ssw.common.routes import ROUTES, Family, families_of_paths, inference_paths, is_inference_path, match


@pytest.mark.parametrize(
    ("method", "path", "family", "response_id"),
    [
        ("POST", "/v1/chat/completions", Family.CHAT, None),
        ("POST", "/v1/responses", Family.RESPONSES, None),
        ("GET", "/v1/responses/resp_abc", Family.RESPONSES, "resp_abc"),
        ("POST", "/v1/responses/resp_abc/cancel", Family.RESPONSES, "resp_abc"),
        ("POST", "/v1/messages", Family.MESSAGES, None),
        ("POST", "/v1/messages/count_tokens", Family.MESSAGES, None),
        ("POST", "/v1/audio/transcriptions", Family.TRANSCRIPTION, None),
        ("POST", "/v2/rerank", Family.RERANK, None),
        ("POST", "/score", Family.SCORE, None),
        ("POST", "/detokenize", Family.TOKENIZE, None),
    ],
)
def test_inference_routes_match(method: str, path: str, family: Family, response_id: str | None) -> None:
    found = match(method, path)
    assert found is not None
    assert (found[0].family, found[1]) == (family, response_id)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
        ("POST", "/collective_rpc"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/chat/completions/render"),
        ("POST", "/v1/chat/completions/batch"),
        ("POST", "/invocations"),
        ("GET", "/v1/chat/completions"),  # the right path, the wrong method
        ("POST", "/v1/responses/resp_a/b/cancel"),
        ("DELETE", "/v1/responses/resp_a"),
        ("POST", "/v1/responses/resp_a"),
        ("POST", "/v1/chat/completions/"),
    ],
)
def test_everything_else_never_matches(method: str, path: str) -> None:
    assert match(method, path) is None


def test_every_route_has_one_family_and_a_unique_method_and_path() -> None:
    keys = [(r.method, r.path) for r in ROUTES]
    assert len(keys) == len(set(keys))
    assert is_inference_path("/v1/chat/completions") and not is_inference_path("/sleep")


def test_families_from_the_paths_a_worker_mounted() -> None:
    # As vLLM's OpenAPI document names them, control paths and all.
    mounted = {"/v1/chat/completions", "/v1/responses/{response_id}", "/sleep", "/tokenize", "/health"}
    assert inference_paths(mounted) == {"/v1/chat/completions", "/v1/responses/{id}", "/tokenize"}
    assert families_of_paths(inference_paths(mounted)) == {Family.CHAT, Family.RESPONSES, Family.TOKENIZE}
