"""The inference routes the gateway relays: an explicit allowlist.

vLLM's API server mounts far more than inference: development and control
endpoints (/sleep, /collective_rpc, /update_weights, /v1/load_lora_adapter,
/pause, ...) that no client may reach. Only the paths listed here ever get to
a worker; every other path is a 404 at the gateway. Each route says what a
model must be able to do to serve it (its family, as ``/v1/models`` shows),
how the gateway finds the model (a JSON field, a multipart form field, or the
stored response a path names), and which dialect its answers speak (where
usage and the first token are, and what an error looks like).

vLLM 0.32 mounts these per model task (vllm/entrypoints/launchers/api_server/
routers.py): generate models the chat, completions, Responses and Anthropic
routes; pooling models embeddings, /pooling, /classify and, where the pooler
scores, score and rerank; speech models the audio routes; every model
tokenize and detokenize.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Family(StrEnum):
    """What a model can serve; one or more routes each."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    MESSAGES = "messages"
    EMBEDDINGS = "embeddings"
    POOLING = "pooling"
    CLASSIFY = "classify"
    SCORE = "score"
    RERANK = "rerank"
    TRANSCRIPTION = "transcription"
    TRANSLATION = "translation"
    TOKENIZE = "tokenize"


class Body(StrEnum):
    JSON = "json"
    MULTIPART = "multipart"  # model is a form field (the audio routes)
    NONE = "none"  # routed by the stored response its path names


class Dialect(StrEnum):
    """Where an answer's usage and first token are, and the shape of its errors."""

    OPENAI = "openai"  # usage.prompt_tokens/completion_tokens; streams of choices
    RESPONSES = "responses"  # usage.input_tokens/output_tokens; typed events
    ANTHROPIC = "anthropic"  # Anthropic's usage, events and error shape


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    family: Family
    method: str = "POST"
    body: Body = Body.JSON
    dialect: Dialect = Dialect.OPENAI
    # ssw may add stream_options.include_usage to count tokens of a stream the client did not ask it for.
    usage_chunk: bool = False
    # The token ceiling a model sets applies to these fields.
    token_fields: tuple[str, ...] = ()
    # Fallback models may answer (not for stateful or model-specific routes).
    fallbacks: bool = True

    @property
    def takes_priority(self) -> bool:
        """Whether vLLM's request for it has a ``priority`` field (X-SSW-Priority maps onto it)."""
        return self.family in PRIORITY and self.body is Body.JSON


# vLLM 0.32's chat, completion, Responses and pooling requests carry a priority.
PRIORITY = {Family.CHAT, Family.COMPLETIONS, Family.RESPONSES, Family.EMBEDDINGS, Family.POOLING}
PRIORITY |= {Family.CLASSIFY, Family.SCORE, Family.RERANK}
_CHAT_TOKENS = ("max_tokens", "max_completion_tokens")

ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", Family.CHAT, usage_chunk=True, token_fields=_CHAT_TOKENS),
    Route("/v1/completions", Family.COMPLETIONS, usage_chunk=True, token_fields=("max_tokens",)),
    Route("/v1/responses", Family.RESPONSES, dialect=Dialect.RESPONSES, token_fields=("max_output_tokens",)),
    Route("/v1/responses/{id}", Family.RESPONSES, method="GET", body=Body.NONE, dialect=Dialect.RESPONSES),
    Route("/v1/responses/{id}/cancel", Family.RESPONSES, body=Body.NONE, dialect=Dialect.RESPONSES),
    Route("/v1/messages", Family.MESSAGES, dialect=Dialect.ANTHROPIC, token_fields=("max_tokens",)),
    Route("/v1/messages/count_tokens", Family.MESSAGES, dialect=Dialect.ANTHROPIC),
    Route("/v1/embeddings", Family.EMBEDDINGS),
    Route("/v2/embed", Family.EMBEDDINGS),
    Route("/pooling", Family.POOLING),
    Route("/classify", Family.CLASSIFY),
    Route("/v1/score", Family.SCORE),
    Route("/score", Family.SCORE),
    Route("/v1/rerank", Family.RERANK),
    Route("/v2/rerank", Family.RERANK),
    Route("/rerank", Family.RERANK),
    Route("/v1/audio/transcriptions", Family.TRANSCRIPTION, body=Body.MULTIPART),
    Route("/v1/audio/translations", Family.TRANSLATION, body=Body.MULTIPART),
    Route("/tokenize", Family.TOKENIZE, fallbacks=False),
    Route("/detokenize", Family.TOKENIZE, fallbacks=False),
)

# vLLM's response ids are "resp_" and a hex uuid; anything else never reaches a path.
RESPONSE_ID = re.compile(r"^resp_[A-Za-z0-9_-]{1,128}\Z")
_PREFIX = "/v1/responses/"
_BY_PATH: dict[tuple[str, str], Route] = {(r.method, r.path): r for r in ROUTES if "{" not in r.path}
_RETRIEVE = next(r for r in ROUTES if r.path == "/v1/responses/{id}")
_CANCEL = next(r for r in ROUTES if r.path == "/v1/responses/{id}/cancel")
PATHS = frozenset(r.path for r in ROUTES)


def match(method: str, path: str) -> tuple[Route, str | None] | None:
    """The route a request is for and, for the stored-response routes, the response
    id its path names; None for every path that is not an inference route."""
    route = _BY_PATH.get((method, path))
    if route is not None:
        return route, None
    if path.startswith(_PREFIX):
        rest = path[len(_PREFIX) :]
        if method == "GET" and "/" not in rest:
            return _RETRIEVE, rest
        if method == "POST" and rest.endswith("/cancel") and rest.count("/") == 1:
            return _CANCEL, rest.removesuffix("/cancel")
    return None


def is_inference_path(path: str) -> bool:
    """Whether any method of ``path`` is relayed (a wrong method is then a 405, not a 404)."""
    return any(match(method, path) for method in ("GET", "POST"))


def inference_paths(paths: set[str]) -> set[str]:
    """Which of a worker's mounted paths are inference routes (its OpenAPI document
    names the stored-response routes with a {response_id} placeholder)."""
    return {p for p in (re.sub(r"\{[^}]+\}", "{id}", p) for p in paths) if p in PATHS}


def families_of_paths(paths: set[str]) -> frozenset[Family]:
    """The families a worker serves, from the inference routes it mounted."""
    return frozenset(r.family for r in ROUTES if r.path in paths)
