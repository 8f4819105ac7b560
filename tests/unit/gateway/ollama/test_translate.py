"""Ollama's requests as OpenAI's, by table: options, format, think, images, tools,
keep_alive, and what is refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from ssw.errors import BadRequest
from ssw.gateway.ollama.translate import chat, embed, generate, keep_alive_seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        (0, 0.0),
        ("0", 0.0),
        (-1, -1.0),
        ("-5m", -1.0),
        (90, 90.0),
        (None, None),
    ],
)
def test_keep_alive_in_ollamas_forms(value: Any, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [], "5d"])
def test_a_keep_alive_that_is_not_a_duration_is_refused(value: Any) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        keep_alive_seconds(value)


def test_chat_maps_options_format_think_and_tools() -> None:
    t = chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 5, "temperature": 0.2, "repeat_penalty": 1.1, "stop": "END", "num_gpu": 1},
            "format": {"type": "object"},
            "think": True,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "stream": False,
        },
        context_length=4096,
        vision=False,
        thinking={"other": 1},
    )
    assert t.path == "/v1/chat/completions" and t.stream is False and t.ignored == ["num_gpu"]
    assert t.body["max_tokens"] == 5 and t.body["temperature"] == 0.2 and t.body["repetition_penalty"] == 1.1
    assert t.body["stop"] == ["END"]
    assert t.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "format", "schema": {"type": "object"}},
    }
    assert t.body["chat_template_kwargs"] == {"other": 1, "enable_thinking": True}
    assert t.body["tools"][0]["function"]["name"] == "f"


def test_an_assistant_tool_call_and_a_tool_answer_take_openais_shape() -> None:
    t = chat(
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
                },
                {"role": "tool", "content": "42", "tool_name": "f"},
            ],
        },
        None,
        False,
        {},
    )
    call = t.body["messages"][0]["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'} and call["type"] == "function"
    assert t.body["messages"][1] == {"role": "tool", "content": "42", "tool_call_id": "f"}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [], "options": {"temperature": "hot"}}, "options.temperature must be a number"),
        ({"messages": [], "options": {"seed": 1.5}}, "options.seed must be an integer"),
        ({"messages": [], "options": {"warp": 9}}, "options.warp is not an option"),
        ({"messages": [], "options": {"num_ctx": 10_000}}, "context length, 4096"),
        ({"messages": [], "options": []}, "options must be an object"),
        ({"messages": [], "format": "yaml"}, "format must be"),
        ({"messages": [], "think": "maybe"}, "think must be"),
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "does not take images"),
        ({"messages": [], "stream": "yes"}, "stream must be"),
    ],
)
def test_what_cannot_be_translated_is_a_400_naming_the_field(body: dict[str, Any], says: str) -> None:
    with pytest.raises(BadRequest) as raised:
        chat({"model": "m", **body}, 4096, False, {})
    assert says in raised.value.message


def test_images_go_as_data_urls_to_a_model_that_takes_them() -> None:
    t = chat({"model": "m", "messages": [{"role": "user", "content": "what", "images": ["aGk="]}]}, None, True, {})
    parts = t.body["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "what"}
    assert parts[1]["image_url"]["url"] == "data:image/png;base64,aGk="
    with pytest.raises(BadRequest, match="base64"):
        chat({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["***"]}]}, None, True, {})


def test_generate_uses_the_chat_template_unless_raw() -> None:
    t = generate({"model": "m", "prompt": "p", "system": "s"}, None, False, {})
    assert t.path == "/v1/chat/completions" and t.body["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
    ]
    raw = generate({"model": "m", "prompt": "p", "raw": True, "stream": False}, None, False, {})
    assert raw.path == "/v1/completions" and raw.body["prompt"] == "p" and raw.stream is False
    assert generate({"model": "m", "prompt": ""}, None, False, {}).empty


@pytest.mark.parametrize(
    ("body", "says"),
    [({"suffix": "end"}, "suffix"), ({"template": "{{ .Prompt }}"}, "template"), ({"context": [1, 2]}, "context")],
)
def test_generate_refuses_what_vllm_cannot_do(body: dict[str, Any], says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        generate({"model": "m", "prompt": "p", **body}, None, False, {})


def test_num_predict_below_zero_means_the_models_own_limit() -> None:
    assert (
        "max_tokens" not in chat({"model": "m", "messages": [], "options": {"num_predict": -1}}, None, False, {}).body
    )


def test_embed_and_the_older_embeddings() -> None:
    t = embed({"model": "e", "input": "a", "dimensions": 8}, legacy=False)
    assert t.path == "/v1/embeddings" and t.body == {"model": "e", "input": ["a"], "dimensions": 8}
    assert embed({"model": "e", "prompt": "a"}, legacy=True).legacy_embedding
    with pytest.raises(BadRequest, match="input must be"):
        embed({"model": "e", "input": []}, legacy=False)
