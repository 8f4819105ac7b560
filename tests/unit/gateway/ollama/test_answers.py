"""OpenAI's answers as Ollama's: whole answers, streams of events (content, thinking,
tool calls in fragments, usage, errors, keep-alive comments) and the durations."""

from __future__ import annotations

import json
import time

from ssw.gateway.ollama.answers import NS, StreamTranslator, Timing, whole


def events(*chunks: object) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def test_a_stream_becomes_lines_and_a_last_one_with_counts_and_durations() -> None:
    timing = Timing(started=time.perf_counter() - 2.0, waited_s=1.5)
    s = StreamTranslator("chat", "m:latest", timing)
    data = events(
        {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
    )
    # Split anywhere: an event may arrive in pieces.
    out = b"".join(s.feed(data[i : i + 7]) for i in range(0, len(data), 7))
    got = lines(out)
    assert [g["message"].get("thinking") for g in got[:1]] == ["hmm"]
    assert [g["message"]["content"] for g in got] == ["", "Hel", "lo", ""]
    last = got[-1]
    assert last["done"] is True and last["done_reason"] == "stop" and last["model"] == "m:latest"
    assert last["prompt_eval_count"] == 7 and last["eval_count"] == 2
    assert 1.4 * NS < last["load_duration"] < 1.6 * NS
    assert last["total_duration"] >= last["load_duration"] + last["prompt_eval_duration"] + last["eval_duration"] - 10
    assert s.end() == []  # once


def test_tool_calls_in_fragments_are_given_whole_in_the_last_line() -> None:
    s = StreamTranslator("chat", "m", Timing())
    out = s.feed(
        events(
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "get_"}}]}}]},
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"ci'}}]}}
                ]
            },
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}}]},
            {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        )
    )
    (last,) = lines(out)
    assert last["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert last["done_reason"] == "stop"


def test_comments_are_skipped_and_an_error_event_ends_the_stream() -> None:
    s = StreamTranslator("generate", "m", Timing())
    out = s.feed(b": keep-alive\n\n" + b'data: {"error": {"message": "loading failed"}}\n\n')
    assert lines(out) == [{"error": "loading failed"}]
    assert s.end() == []


def test_a_completion_stream_fills_response() -> None:
    s = StreamTranslator("generate", "m", Timing())
    got = lines(s.feed(events({"choices": [{"text": "ab"}]}, {"choices": [{"text": "", "finish_reason": "length"}]})))
    assert [g["response"] for g in got] == ["ab", ""] and got[-1]["done_reason"] == "length"


def test_whole_answers() -> None:
    chat = whole(
        "chat",
        "m",
        {
            "choices": [
                {
                    "message": {
                        "content": "",
                        "reasoning_content": "why",
                        "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        },
        Timing(),
    )
    assert chat["message"]["thinking"] == "why"
    assert chat["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"arguments": "not json"}}}]
    assert chat["eval_count"] == 1 and chat["done"] is True
    gen = whole("generate", "m", {"choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}, Timing())
    assert gen["response"] == "x" and gen["done_reason"] == "length"
    emb = whole(
        "embed", "m", {"data": [{"embedding": [0.1]}, {"embedding": [0.2]}], "usage": {"prompt_tokens": 2}}, Timing()
    )
    assert emb["embeddings"] == [[0.1], [0.2]] and emb["prompt_eval_count"] == 2
    assert whole("embed", "m", {"data": [{"embedding": [0.1]}]}, Timing(), legacy_embedding=True) == {
        "embedding": [0.1]
    }
