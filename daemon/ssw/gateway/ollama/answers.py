"""OpenAI's answers as Ollama's (pure, apart from the clock): a chat completion,
completion or embedding becomes Ollama's object; a stream of server-sent events
becomes Ollama's NDJSON lines, one per piece of content, and a last one with
``done``, the reason, the token counts and the durations (nanoseconds, as
Ollama gives them). Tool calls, streamed by vLLM in fragments, are gathered and
given whole, as Ollama does."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

NS = 1_000_000_000
MAX_EVENT_BYTES = 16 * 2**20  # one event of a stream; the relay has bounded it already


def created_at(when: float | None = None) -> str:
    stamp = datetime.fromtimestamp(time.time() if when is None else when, UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Timing:
    """When the request arrived, how long it waited for a load, and its first token."""

    started: float = field(default_factory=time.perf_counter)
    waited_s: float = 0.0
    first_token: float | None = None

    def durations(self, prompt_tokens: int | None, completion_tokens: int | None) -> dict[str, Any]:
        now = time.perf_counter()
        total = now - self.started
        load = min(self.waited_s, total)
        # Without a first token seen (an answer in one piece), all of the rest counts as
        # generation: ssw cannot see vLLM's prefill apart from its decoding.
        prompt = max((self.first_token or (self.started + load)) - self.started - load, 0.0)
        return {
            "total_duration": int(total * NS),
            "load_duration": int(load * NS),
            "prompt_eval_count": prompt_tokens or 0,
            "prompt_eval_duration": int(prompt * NS),
            "eval_count": completion_tokens or 0,
            "eval_duration": int(max(total - load - prompt, 0.0) * NS),
        }


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments: Any = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = {"arguments": arguments}  # not JSON: given as the model wrote it
        out.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return out


def _done_reason(finish: Any) -> str:
    return "length" if finish == "length" else "stop"


def whole(
    kind: str, model: str, answer: dict[str, Any], timing: Timing, legacy_embedding: bool = False
) -> dict[str, Any]:
    """One OpenAI answer (not streamed) as Ollama's."""
    raw_usage = answer.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if kind == "embed":
        vectors = [d.get("embedding") for d in answer.get("data", []) if isinstance(d, dict)]
        durations = timing.durations(prompt, None)
        if legacy_embedding:
            return {"embedding": vectors[0] if vectors else []}
        return {
            "model": model,
            "embeddings": vectors,
            "total_duration": durations["total_duration"],
            "load_duration": durations["load_duration"],
            "prompt_eval_count": durations["prompt_eval_count"],
        }
    choice = (answer.get("choices") or [{}])[0]
    out: dict[str, Any] = {"model": model, "created_at": created_at()}
    if "message" in choice:
        message = choice.get("message") or {}
        content = message.get("content") or ""
        thinking = message.get("reasoning_content") or message.get("reasoning")
        calls = _tool_calls(message.get("tool_calls"))
        if kind == "chat":
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            out["message"] = msg
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
    else:
        out["response"] = choice.get("text") or ""
    out |= {"done": True, "done_reason": _done_reason(choice.get("finish_reason"))}
    return out | timing.durations(prompt, completion)


class StreamTranslator:
    """Server-sent events of a chat completion or completion in, Ollama's NDJSON out."""

    def __init__(self, kind: str, model: str, timing: Timing) -> None:
        self.kind = kind
        self.model = model
        self.timing = timing
        self._buffer = b""
        self._calls: dict[int, dict[str, Any]] = {}  # index -> the call as gathered so far
        self._finish: Any = None
        self._usage: dict[str, Any] = {}
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        """Ollama's lines for the events that ``data`` completes."""
        self._buffer += data
        out: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            out.extend(self._event(event))
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._buffer = b""
            out.append(self._line({"error": "an event of the answer was too large"}))
        return b"".join(out)

    def _event(self, event: bytes) -> list[bytes]:
        data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return []  # a comment: the gateway's keep-alive while the model loads
        if data == b"[DONE]":
            return self.end()
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            self.finished = True
            return [self._line({"error": str(message)})]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        lines = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            piece = self._piece(choice)
            if piece is not None:
                if self.timing.first_token is None:
                    self.timing.first_token = time.perf_counter()
                lines.append(self._line({"model": self.model, "created_at": created_at(), **piece, "done": False}))
        return lines

    def _piece(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        if self.kind != "chat" and "text" in choice:
            text = choice.get("text") or ""
            return {"response": text} if text else None
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                slot = self._calls.setdefault(int(call.get("index", 0)), {"name": "", "arguments": ""})
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
        content = delta.get("content") or ""
        thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
        if not content and not thinking:
            return None
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            return {"message": message}
        return {"response": content, **({"thinking": thinking} if thinking else {})}

    def end(self) -> list[bytes]:
        """The last line (once): the gathered tool calls, the reason, the counts, the durations."""
        if self.finished:
            return []
        self.finished = True
        last: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            calls = _tool_calls(
                [{"function": c} for _, c in sorted(self._calls.items())],
            )
            if calls:
                message["tool_calls"] = calls
            last["message"] = message
        else:
            last["response"] = ""
        last |= {"done": True, "done_reason": _done_reason(self._finish)}
        last |= self.timing.durations(self._usage.get("prompt_tokens"), self._usage.get("completion_tokens"))
        return [self._line(last)]

    @staticmethod
    def _line(obj: dict[str, Any]) -> bytes:
        return orjson.dumps(obj) + b"\n"
