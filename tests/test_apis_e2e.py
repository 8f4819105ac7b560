"""Every inference API vLLM serves, through the gateway, against real systemd
with the fake engine (which mounts what vLLM 0.32 mounts per model task):
the Responses API with stored responses across two gateway processes,
Anthropic Messages with the official SDK, audio as multipart, pooling, score
and rerank, tokenize; /v1/models capabilities; and vLLM's control and
development paths, which never reach a worker."""

from __future__ import annotations

import json
import signal
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.fake_apis import CONTROL_PATHS
from tests.harness.stack import WORK_ROOT, RedisServer, http, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
MODELS = {
    # Two replicas: a stored response must go back to the one that holds it.
    "alpha": {"path": "fake-a", "vram_gb": 2, "replicas": 2, "aliases": ["light"]},
    "other": {"path": "fake-b", "vram_gb": 2},
    "embedder": {"path": "fake-b", "vram_gb": 2, "runner": "pooling", "convert": "embed", "aliases": ["emb"]},
    "ranker": {"path": "fake-ranker", "vram_gb": 2},
    "labeler": {"path": "fake-labeler", "vram_gb": 2},
    "whisper": {"path": "fake-whisper", "vram_gb": 2, "aliases": ["asr"]},
}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path, redis_server: RedisServer) -> Iterator[Stack]:
    classifier = {**QWEN2_CONFIG, "architectures": ["Qwen2ForSequenceClassification"]}
    make_model_dir(models_root / "fake-ranker", {**classifier, "num_labels": 1})  # a cross-encoder
    make_model_dir(models_root / "fake-labeler", {**classifier, "id2label": {"0": "neg", "1": "pos"}})
    make_model_dir(
        models_root / "fake-whisper", {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}
    )
    extra = {"gateway": {"processes": 2}, "auth": {"enabled": True}}
    s = start_stack(
        sysbox, WORK_ROOT / f"apis-{id(sysbox)}", models_root, MODELS, "fake", extra, redis_url=redis_server.url
    )
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, str]:
    out = {
        "main": stack.add_key("main"),
        "other": stack.add_key("other"),
        "scoped": stack.add_key("scoped", "--models", "other"),
    }
    assert stack.gateway.proc is not None
    stack.gateway.proc.send_signal(signal.SIGHUP)  # every gateway process reloads the keys
    wait_for(
        lambda: http("GET", stack.public + "/v1/models", headers=auth(out["scoped"]))[0] == 200, 10, "the new keys"
    )
    return out


def auth(key: str) -> dict[str, str]:
    # A new connection each time: the kernel spreads them over both gateway processes.
    return {"Authorization": f"Bearer {key}", "Connection": "close"}


def oai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.public + "/v1", api_key=key, max_retries=0, timeout=60)


def post(stack: Stack, key: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    return http("POST", stack.public + path, body, auth(key), timeout=60)


def worker_sockets(stack: Stack, model: str) -> dict[str, str]:
    return {w["unit"]: w["socket"] for w in stack.status()["workers"] if w["model"] == model and w["state"] == "ready"}


# --- capabilities -------------------------------------------------------------------------------------


def test_models_say_what_each_can_serve_and_other_routes_are_a_clear_400(stack: Stack, keys: dict[str, str]) -> None:
    stack.unload("whisper")
    stack.unload("labeler")
    listed = {m["id"]: m for m in http("GET", stack.public + "/v1/models", headers=auth(keys["main"]))[2]["data"]}
    caps = {name: set(listed[name]["ssw"]["capabilities"]) for name in MODELS}
    assert {"chat", "completions", "responses", "messages", "tokenize"} <= caps["alpha"]
    assert caps["embedder"] == {"embeddings", "pooling", "score", "rerank", "tokenize"}
    assert caps["ranker"] == {"classify", "pooling", "score", "rerank", "tokenize"}
    assert caps["labeler"] == {"classify", "pooling", "tokenize"}  # two labels: no scores
    assert caps["whisper"] == {"transcription", "translation", "tokenize"}
    for model, path, body in (
        ("embedder", "/v1/chat/completions", {"messages": CHAT}),
        ("alpha", "/v1/embeddings", {"input": "x"}),
        ("labeler", "/v1/rerank", {"query": "q", "documents": ["d"]}),
        ("whisper", "/v1/responses", {"input": "x"}),
    ):
        status, _, answer = post(stack, keys["main"], path, {"model": model, **body})
        assert status == 400 and answer["error"]["code"] == "unsupported_route", (model, path, answer)
        assert "GET /v1/models" in answer["error"]["message"]
    # Refused before any worker was started for it.
    assert not worker_sockets(stack, "whisper") and not worker_sockets(stack, "labeler")


def test_capabilities_are_measured_once_a_worker_ran(stack: Stack, keys: dict[str, str]) -> None:
    stack.load("embedder")
    # Asked of the worker a few seconds after it became ready (not while waiters arrive).
    wait_for(lambda: stack.status()["models"]["embedder"]["capabilities_measured"], 30, "the measured routes")
    facts = json.loads((stack.dir / "state" / "models.json").read_text())["models"]["embedder"]
    assert "/v1/embeddings" in facts["routes"] and "/v1/chat/completions" not in facts["routes"]

    def measured_at_the_gateway() -> bool:
        listed = http("GET", stack.public + "/v1/models", headers=auth(keys["main"]))[2]["data"]
        return next(m for m in listed if m["id"] == "embedder")["ssw"]["capabilities_measured"] is True

    # The gateway follows the loader's snapshot: it says so too, shortly.
    wait_for(measured_at_the_gateway, 10, "/v1/models to say the capabilities were measured")


# --- the Responses API ----------------------------------------------------------------------------------


def test_responses_create_stream_retrieve_and_continue_on_the_holding_worker(
    stack: Stack, keys: dict[str, str], redis_server: RedisServer
) -> None:
    stack.load("alpha")
    assert len(worker_sockets(stack, "alpha")) == 2
    for _ in range(6):  # new connections: creates and follow-ups land on both gateway processes
        with oai(stack, keys["main"]) as c:
            first = c.responses.create(model="light", input="hello", max_output_tokens=3)
        assert first.status == "completed" and first.output_text == "t0 t1 t2" and first.model == "alpha"
        assert first.usage is not None and first.usage.output_tokens == 3
        with oai(stack, keys["main"]) as c:
            again = c.responses.retrieve(first.id)
            assert again.id == first.id and again.output_text == first.output_text
            # A continuation reaches the replica holding the first (another would answer 404).
            follow = c.responses.create(model="alpha", input="more", previous_response_id=first.id, max_output_tokens=2)
        assert follow.output_text == f"t0 t1 (after {first.id})"
    with oai(stack, keys["main"]) as c:
        events = list(c.responses.create(model="alpha", input="hi", max_output_tokens=4, stream=True))
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "t0 t1 t2 t3"
        streamed_id = events[0].response.id
        assert c.responses.retrieve(streamed_id).output_text == text
    # Every gateway process and a restarted gateway find them: noted in Redis with an expiry.
    r = redis_server.client(decode_responses=True)
    ttl = r.ttl(f"ssw:response:{streamed_id}")
    assert 0 < ttl <= 24 * 3600
    assert json.loads(r.get(f"ssw:response:{streamed_id}"))[:2][0] == "alpha"


def test_a_stored_response_is_only_its_creators_and_gone_with_its_worker(stack: Stack, keys: dict[str, str]) -> None:
    stack.load("alpha")
    with oai(stack, keys["main"]) as c:
        created = c.responses.create(model="alpha", input="hello", max_output_tokens=2)
    for key in (keys["other"], keys["scoped"]):
        with oai(stack, key) as c, pytest.raises(openai.NotFoundError) as err:
            c.responses.retrieve(created.id)
        assert err.value.code == "response_not_found"
        status, _, body = post(
            stack, key, "/v1/responses", {"model": "alpha", "input": "x", "previous_response_id": created.id}
        )
        assert status in (403, 404), body  # the scoped key may not use alpha at all
    for bad in ("resp_nope", "../../etc/passwd", "resp_" + "x" * 300, "1 OR 1=1"):
        status, _, body = http(
            "GET", stack.public + "/v1/responses/" + urllib.parse.quote(bad, safe=""), headers=auth(keys["main"])
        )
        assert status == 404 and body["error"]["code"] in ("response_not_found", None), (bad, body)
    # A continuation names its own model; another model cannot continue it.
    status, _, body = post(
        stack, keys["main"], "/v1/responses", {"model": "other", "input": "x", "previous_response_id": created.id}
    )
    assert status == 400 and "belongs to model 'alpha'" in body["error"]["message"]
    # The worker that held it goes: a clear 404, never another worker's answer.
    stack.unload("alpha")
    with oai(stack, keys["main"]) as c, pytest.raises(openai.NotFoundError) as err:
        c.responses.retrieve(created.id)
    assert "no longer serves" in str(err.value)


def test_a_background_response_can_be_cancelled(stack: Stack, keys: dict[str, str]) -> None:
    stack.load("alpha")
    with oai(stack, keys["main"]) as c:
        queued = c.responses.create(model="alpha", input="long", background=True, max_output_tokens=4)
        assert queued.status in ("queued", "in_progress")
        cancelled = c.responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        assert c.responses.retrieve(queued.id).status == "cancelled"


# --- Anthropic Messages -------------------------------------------------------------------------------


def test_anthropic_sdk_messages_streamed_and_not_and_count_tokens(
    stack: Stack, keys: dict[str, str], request: pytest.FixtureRequest
) -> None:
    stack.load("alpha")
    client = anthropic.Anthropic(base_url=stack.public, api_key=keys["main"], max_retries=0)  # sends x-api-key
    request.addfinalizer(client.close)
    message = client.messages.create(model="light", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "t0 t1 t2" and message.model == "alpha"  # type: ignore[union-attr]
    assert message.usage.output_tokens == 3
    with client.messages.stream(model="alpha", max_tokens=4, messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "t0 t1 t2 t3" and final.usage.output_tokens == 4
    counted = client.messages.count_tokens(model="alpha", messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens > 0
    # Errors in Anthropic's shape on this route, which its SDK raises as the right class.
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with (
        anthropic.Anthropic(base_url=stack.public, api_key="wrong", max_retries=0) as wrong,
        pytest.raises(anthropic.AuthenticationError),
    ):
        wrong.messages.create(model="alpha", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    status, _, body = post(
        stack, keys["main"], "/v1/messages", {"model": "alpha", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 400 and body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' is required", "source": "ssw-gateway"},
    }


# --- audio, pooling, score, rerank, tokenize ------------------------------------------------------------


def test_audio_goes_as_multipart_with_the_model_as_a_form_field(
    stack: Stack, keys: dict[str, str], tmp_path: Path
) -> None:
    audio = tmp_path / "clip.wav"
    audio.write_bytes(b"RIFF" + bytes(2000))
    data = ("clip.wav", audio.read_bytes())
    with oai(stack, keys["main"]) as c:
        # By alias: the form is rewritten with the model's own name (the fake checks it).
        text = c.audio.transcriptions.create(model="asr", file=data)
        assert text.text == "fake transcription of 2004 bytes from clip.wav"

    def form(*fields: tuple[str, str]) -> bytes:
        parts = [
            b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + data[1] + b"\r\n"
        ]
        for name, value in fields:
            parts.append(f'--b0undary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        return b"".join(parts) + b"--b0undary--\r\n"

    multipart = {**auth(keys["main"]), "Content-Type": "multipart/form-data; boundary=b0undary"}
    # (The SDK marks its translations call deprecated: a plain multipart POST.)
    url = stack.public + "/v1/audio/"
    status, _, translated = http("POST", url + "translations", form(("model", "asr")), multipart)
    assert status == 200 and translated["text"] == "fake translation of 2004 bytes from clip.wav"
    # Streamed as vLLM streams it (chunks with choices), relayed as it comes.
    status, headers, events = http(
        "POST", url + "transcriptions", form(("model", "asr"), ("stream", "true")), multipart
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    deltas = [
        json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events.split("\n\n") if e.startswith("data: {")
    ]
    assert "".join(deltas).startswith("fake transcription of 2004 bytes") and events.rstrip().endswith("[DONE]")
    status, _, body = http(
        "POST",
        stack.public + "/v1/audio/transcriptions",
        b"not a form",
        {**auth(keys["main"]), "Content-Type": "text/plain"},
    )
    assert status == 400 and "multipart/form-data" in body["error"]["message"]


def test_pooling_score_rerank_classify_and_tokenize(stack: Stack, keys: dict[str, str]) -> None:
    key = keys["main"]
    with oai(stack, key) as c:
        emb = c.embeddings.create(model="emb", input=["a", "bbb"])
    assert [d.embedding[-1] for d in emb.data] == [1.0, 3.0] and emb.model == "embedder"
    for path, body, check in (
        ("/v2/embed", {"texts": ["a"]}, lambda b: b["embeddings"]["float"][0][-1] == 1.0),
        ("/pooling", {"input": "ab"}, lambda b: b["data"][0]["data"][-1] == 2.0),
        (
            "/v1/score",
            {"text_1": "a b", "text_2": ["a b", "c"]},
            lambda b: [d["score"] for d in b["data"]] == [1.0, 0.0],
        ),
        ("/score", {"text_1": "a", "text_2": "a"}, lambda b: b["data"][0]["score"] == 1.0),
        ("/v1/rerank", {"query": "a b", "documents": ["c", "a b"]}, lambda b: b["results"][0]["index"] == 1),
        ("/v2/rerank", {"query": "a", "documents": ["a"], "top_n": 1}, lambda b: len(b["results"]) == 1),
        ("/rerank", {"query": "a", "documents": ["b", "a"]}, lambda b: b["results"][0]["relevance_score"] == 1.0),
    ):
        status, _, answer = post(stack, key, path, {"model": "emb", **body})
        assert status == 200 and check(answer), (path, answer)
    status, _, answer = post(stack, key, "/v1/rerank", {"model": "ranker", "query": "a", "documents": ["a"]})
    assert status == 200 and answer["results"][0]["relevance_score"] == 1.0
    status, _, answer = post(stack, key, "/classify", {"model": "labeler", "input": ["x"]})
    assert status == 200 and answer["data"][0]["num_classes"] == 2
    status, _, tokens = post(stack, key, "/tokenize", {"model": "light", "prompt": "hi"})
    assert status == 200 and tokens["tokens"] == [104, 105]
    status, _, text = post(stack, key, "/detokenize", {"model": "alpha", "tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"] == "hi"
    status, _, bad = post(stack, key, "/detokenize", {"model": "alpha", "tokens": ["x"]})
    assert status == 400 and "'tokens'" in bad["error"]["message"]


# --- nothing else reaches a worker ----------------------------------------------------------------------


def test_control_and_development_paths_never_reach_a_worker(stack: Stack, keys: dict[str, str]) -> None:
    stack.load("alpha")
    stack.load("embedder")
    sockets = {**worker_sockets(stack, "alpha"), **worker_sockets(stack, "embedder")}
    for method, path in CONTROL_PATHS:
        for body in ({"model": "alpha"}, {"model": "embedder"}, None):
            status, _, answer = http(
                method, stack.public + path, body if method == "POST" else None, auth(keys["main"])
            )
            assert status in (404, 405), (method, path, status)
            assert isinstance(answer, dict) and "error" in answer, (path, answer)
    # The workers mount every one of them (as vLLM with VLLM_SERVER_DEV_MODE=1), and saw none.
    for sock in sockets.values():
        status, seen = worker_http(sock, "GET", "/ssw-fake/seen")
        assert status == 200
        reached = {line.split(" ", 1)[1] for line in seen} & {path for _, path in CONTROL_PATHS}
        assert not reached, reached
    print(f"{len(CONTROL_PATHS)} control paths x 3 bodies: none reached {len(sockets)} workers")


def test_requests_are_counted_per_route_with_their_tokens(
    stack: Stack, keys: dict[str, str], redis_server: RedisServer
) -> None:
    stack.load("alpha")
    with (
        anthropic.Anthropic(base_url=stack.public, api_key=keys["main"], max_retries=0) as client,
        client.messages.stream(model="alpha", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as stream,
    ):
        stream.get_final_message()
    with oai(stack, keys["main"]) as c:
        list(c.responses.create(model="alpha", input="hi", max_output_tokens=6, stream=True))
    r = redis_server.client(decode_responses=True)

    def record(route: str, completion: int) -> dict[str, Any] | None:
        for _, fields in reversed(r.xrange("ssw:requests")):
            rec = json.loads(fields["r"])
            if rec["route"] == route and rec["completion_tokens"] == completion:
                return rec
        return None

    messages = wait_for(lambda: record("/v1/messages", 5), 15, "the Messages stream's record")
    responses = wait_for(lambda: record("/v1/responses", 6), 15, "the Responses stream's record")
    for rec in (messages, responses):
        assert rec["prompt_tokens"] > 0 and rec["ttft_ms"] is not None and rec["stream"] is True
    text = http("GET", stack.gateway_metrics + "/metrics")[2]
    routes = {
        sample.labels["route"]
        for family in text_string_to_metric_families(text)
        if family.name == "ssw_requests"
        for sample in family.samples
        if sample.name == "ssw_requests_total"
    }
    assert {"/v1/messages", "/v1/responses"} <= routes
    stats = http("GET", stack.admin + "/stats?window=5m")[2]["models"]["alpha"]["routes"]
    assert stats["/v1/messages"] >= 1 and stats["/v1/responses"] >= 1
