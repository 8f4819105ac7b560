"""Ollama's requests as the OpenAI requests ssw serves (pure): /api/chat and
/api/generate become chat completions (or, for a raw prompt, a completion),
/api/embed and /api/embeddings become embeddings; ``options`` become vLLM's
sampling parameters, ``format`` its structured output, ``think`` the chat
template's thinking switch; ``keep_alive`` is read in Ollama's forms. Anything
that cannot be translated is a :class:`~ssw.errors.BadRequest` naming the field."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ssw.errors import BadRequest

# Ollama's options with a vLLM equivalent: Ollama's name -> the request's field.
OPTIONS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Ollama's options that mean nothing to vLLM (the engine's own settings, llama.cpp's
# samplers): ignored, and named in the X-SSW-Ignored-Options header of the answer.
IGNORED_OPTIONS = frozenset(
    {
        "num_keep",
        "typical_p",
        "repeat_last_n",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
        "tfs_z",
    }
)
INTEGER_OPTIONS = frozenset({"num_predict", "top_k", "seed", "num_ctx"})
MAX_STOP = 16
DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?$")
UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_KEEP_ALIVE_S = 365 * 86400


@dataclass
class Translated:
    """An Ollama request as ssw serves it."""

    path: str  # the OpenAI route it goes to
    body: dict[str, Any]  # that route's request body
    model: str  # the name the client asked for (answered back as is)
    stream: bool
    kind: str  # "chat", "generate" or "embed"
    keep_alive_s: float | None = None  # None: the model's own setting stays
    ignored: list[str] = field(default_factory=list)  # options with no vLLM equivalent
    empty: bool = False  # no messages or prompt: Ollama's load (or, with keep_alive 0, unload) idiom
    legacy_embedding: bool = False  # /api/embeddings: one "embedding", not "embeddings"


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive: a duration string ("5m", "1h30m" is not Ollama's; "30s", "0"),
    a number of seconds, 0 (unload now) or a negative value (for ever: -1)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a duration such as '5m', a number of seconds, 0 or -1")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := DURATION.match(value.strip())):
        seconds = float(m.group(1)) * UNIT_S[m.group(2)]
    else:
        raise BadRequest("keep_alive must be a duration such as '5m', a number of seconds, 0 or -1")
    if seconds < 0:
        return -1.0
    return min(seconds, MAX_KEEP_ALIVE_S)


def _options(raw: Any, context_length: int | None) -> tuple[dict[str, Any], list[str]]:
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise BadRequest("options must be an object")
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in raw.items():
        if name in IGNORED_OPTIONS:
            ignored.append(name)
            continue
        if name == "num_ctx":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadRequest("options.num_ctx must be a positive integer")
            if context_length is not None and value > context_length:
                raise BadRequest(f"options.num_ctx {value} is more than this model's context length, {context_length}")
            continue  # vLLM's context is the model's (max_model_len): within it, nothing to do
        if name not in OPTIONS:
            raise BadRequest(f"options.{name[:64]} is not an option ssw knows")
        if name == "stop":
            if isinstance(value, str):
                value = [value]
            if not (isinstance(value, list) and len(value) <= MAX_STOP and all(isinstance(v, str) for v in value)):
                raise BadRequest(f"options.stop must be a string or a list of at most {MAX_STOP} strings")
        elif name in INTEGER_OPTIONS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequest(f"options.{name} must be an integer")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise BadRequest(f"options.{name} must be a number")
        if name == "num_predict" and value < 0:
            continue  # -1 (no limit), -2 (fill the context): vLLM's default, the model's length
        out[OPTIONS[name]] = value
    return out, sorted(ignored)


def _format(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if value == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(value, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}}
    raise BadRequest("format must be 'json' or a JSON schema (an object)")


def _think(value: Any, thinking_kwargs: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if value in ("high", "medium", "low"):
        value = True  # gpt-oss's levels: vLLM's templates take on or off
    if not isinstance(value, bool):
        raise BadRequest("think must be true, false, or 'high', 'medium' or 'low'")
    return {"chat_template_kwargs": {**thinking_kwargs, "enable_thinking": value}}


def _images(raw: Any, vision: bool) -> list[dict[str, Any]]:
    if not raw:
        return []
    if not vision:
        raise BadRequest("this model does not take images")
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise BadRequest("images must be a list of base64-encoded images")
    parts = []
    for image in raw:
        try:
            base64.b64decode(image, validate=True)
        except ValueError:
            raise BadRequest("images must be base64-encoded") from None
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}})
    return parts


def _message(raw: Any, index: int, vision: bool) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest(f"messages[{index}] must be an object")
    role = raw.get("role")
    if role not in ("system", "user", "assistant", "tool"):
        raise BadRequest(f"messages[{index}].role must be system, user, assistant or tool")
    content = raw.get("content", "")
    if not isinstance(content, str):
        raise BadRequest(f"messages[{index}].content must be a string")
    images = _images(raw.get("images"), vision)
    out: dict[str, Any] = {"role": role, "content": [{"type": "text", "text": content}, *images] if images else content}
    if role == "assistant" and raw.get("tool_calls"):
        calls = raw["tool_calls"]
        if not isinstance(calls, list):
            raise BadRequest(f"messages[{index}].tool_calls must be a list")
        out["tool_calls"] = [_tool_call(c, index, n) for n, c in enumerate(calls)]
    if role == "tool":
        # Ollama names the tool; OpenAI's shape wants the id of the call it answers.
        out["tool_call_id"] = str(raw.get("tool_call_id") or raw.get("tool_name") or f"call_{index}")
    return out


def _tool_call(raw: Any, index: int, n: int) -> dict[str, Any]:
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"messages[{index}].tool_calls[{n}] must have a function with a name")
    arguments = function.get("arguments", {})
    return {
        "id": str(raw.get("id") or f"call_{index}_{n}"),
        "type": "function",
        "function": {
            "name": function["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }


def _tools(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise BadRequest("tools must be a list of objects")
    return {"tools": [t if "type" in t else {"type": "function", "function": t} for t in raw]}


def _usage(stream: bool) -> dict[str, Any]:
    # Ollama's last line carries the token counts: a stream must end with vLLM's usage.
    return {"stream_options": {"include_usage": True}} if stream else {}


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    return stream


def chat(body: dict[str, Any], context_length: int | None, vision: bool, thinking: dict[str, Any]) -> Translated:
    raw = body.get("messages") or []
    if not isinstance(raw, list):
        raise BadRequest("messages must be a list")
    messages = [_message(m, i, vision) for i, m in enumerate(raw)]
    options, ignored = _options(body.get("options"), context_length)
    stream = _stream(body)
    out = {
        "model": body["model"],
        "messages": messages,
        "stream": stream,
        **_usage(stream),
        **options,
        **_format(body.get("format")),
        **_think(body.get("think"), thinking),
        **_tools(body.get("tools")),
    }
    return Translated(
        "/v1/chat/completions",
        out,
        body["model"],
        stream,
        "chat",
        keep_alive_seconds(body.get("keep_alive")),
        ignored,
        empty=not messages,
    )


def generate(body: dict[str, Any], context_length: int | None, vision: bool, thinking: dict[str, Any]) -> Translated:
    prompt = body.get("prompt", "")
    system = body.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise BadRequest("prompt and system must be strings")
    if body.get("suffix"):
        raise BadRequest("suffix (fill in the middle) is not supported: vLLM's completions do not take one")
    if body.get("template"):
        raise BadRequest("template is not supported: vLLM applies the model's own chat template (or use raw)")
    if body.get("context"):
        raise BadRequest("context (token ids of an earlier answer) is not supported: use /api/chat")
    options, ignored = _options(body.get("options"), context_length)
    stream = _stream(body)
    keep = keep_alive_seconds(body.get("keep_alive"))
    common = {"model": body["model"], "stream": stream, **_usage(stream), **options, **_format(body.get("format"))}
    if body.get("raw"):
        if body.get("images"):
            raise BadRequest("images need the chat template: they cannot go with raw")
        return Translated(
            "/v1/completions",
            {**common, "prompt": prompt},
            body["model"],
            stream,
            "generate",
            keep,
            ignored,
            empty=not prompt,
        )
    images = _images(body.get("images"), vision)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if prompt or images:
        messages.append({"role": "user", "content": [{"type": "text", "text": prompt}, *images] if images else prompt})
    out = {**common, "messages": messages, **_think(body.get("think"), thinking)}
    return Translated(
        "/v1/chat/completions", out, body["model"], stream, "generate", keep, ignored, empty=not prompt and not images
    )


def embed(body: dict[str, Any], legacy: bool) -> Translated:
    value = body.get("prompt") if legacy else body.get("input")
    if isinstance(value, str):
        inputs: list[str] = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = value
    else:
        name = "prompt" if legacy else "input"
        raise BadRequest(f"{name} must be a string or a non-empty list of strings")
    out: dict[str, Any] = {"model": body["model"], "input": inputs}
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            raise BadRequest("dimensions must be a positive integer")
        out["dimensions"] = dimensions
    if body.get("truncate") is False:
        pass  # vLLM refuses an input over the model's length: what truncate false asks for
    _, ignored = _options(body.get("options"), None)
    return Translated(
        "/v1/embeddings",
        out,
        body["model"],
        False,
        "embed",
        keep_alive_seconds(body.get("keep_alive")),
        ignored,
        legacy_embedding=legacy,
    )
