"""Ollama's API, on real systemd with the fake engine, through the official `ollama`
libraries used unmodified, Python's (PyPI `ollama`) and JavaScript's (npm `ollama`,
run with Node from Debian; each takes the key as a header): chat (streamed and
not, with tools, with a JSON schema as format, with think), generate, embed,
list, ps, show, pull with progress (from a local hub), version, keep_alive's load
and unload idioms; a request held for a load answers with a load_duration that
matches the load; and hostile names, oversized bodies and bad options get 4xx in
Ollama's shape with nothing loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import ollama
import pytest

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.fake_hub import FakeHub
from tests.harness.stack import REPO, WORK_ROOT, RedisServer, http, wait_for

pytestmark = pytest.mark.systemd
MODELS = {
    "chatty": {"path": "fake-a", "vram_gb": 1, "gpus": [0], "aliases": ["deepseek-coder:33b"]},
    "embedder": {"path": "fake-a", "vram_gb": 1, "gpus": [0], "runner": "pooling", "convert": "embed"},
    # A cold start of 2 s: a held request's load_duration is measured against it.
    "slowload": {"path": "fake-a", "vram_gb": 1, "gpus": [0], "env": {"SSW_FAKE_LOAD_DELAY": "2"}},
}
# A small body limit, so an oversized body is quick to send.
EXTRA = {"auth": {"enabled": True}, "limits": {"max_body_bytes": 65536}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    repos = {}
    for name in ("tiny", "tiny-js"):
        source = make_model_dir(WORK_ROOT / "ollama-hub-src" / name, QWEN2_CONFIG, weight_bytes=2_000_000)
        (source / "tokenizer.json").write_text("{}")
        repos[f"acme/{name}"] = source
    server = FakeHub(repos).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(sysbox, hub: FakeHub, redis_server: RedisServer) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    # A models dir of its own: pulls land in it.
    models_dir = WORK_ROOT / f"ollama-models-{id(sysbox)}"
    make_model_dir(models_dir / "fake-a", QWEN2_CONFIG)
    extra = {**EXTRA, "pulls": {"endpoint": hub.url, "allow_http": True, "token_file": None, "min_free_gb": 0.1}}
    s = start_stack(sysbox, WORK_ROOT / f"ollama-{id(sysbox)}", models_dir, MODELS, "fake", extra, redis_server.url)
    yield s
    stop_stack(s)
    shutil.rmtree(models_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.add_key("ollama-user")


@pytest.fixture(scope="module")
def client(stack: Stack, key: str) -> Iterator[ollama.Client]:
    client = ollama.Client(host=stack.public, headers={"Authorization": f"Bearer {key}"})
    # The gateway reads the key file when it changes: wait until the new key works.
    wait_for(lambda: _works(client), 30, "the new key to be accepted")
    yield client
    client._client.close()


def _works(client: ollama.Client) -> bool:
    try:
        client.list()
        return True
    except ollama.ResponseError:
        return False


def loaded(stack: Stack) -> set[str]:
    return {w["model"] for w in stack.status()["workers"]}


def test_version_and_the_root_answer_as_ollama_does(stack: Stack) -> None:
    status, _, body = http("GET", stack.public + "/")
    assert status == 200 and body == "Ollama is running"
    status, _, body = http("GET", stack.public + "/api/version")
    assert status == 200 and body["version"].count(".") == 2


def test_without_a_key_every_route_is_401_in_ollamas_shape(stack: Stack) -> None:
    anonymous = ollama.Client(host=stack.public)
    with pytest.raises(ollama.ResponseError) as raised:
        anonymous.list()
    anonymous._client.close()
    assert raised.value.status_code == 401


def test_chat_not_streamed_and_streamed(client: ollama.Client) -> None:
    answer = client.chat(model="chatty", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    assert answer.message.role == "assistant" and answer.message.content == "t0 t1 t2"
    assert answer.done and answer.done_reason == "length" and answer.eval_count == 3
    assert answer.total_duration and answer.total_duration > 0 and answer.prompt_eval_count
    parts = list(
        client.chat(
            model="chatty:latest", messages=[{"role": "user", "content": "hi"}], stream=True, options={"num_predict": 4}
        )
    )
    assert "".join(p.message.content for p in parts) == "t0 t1 t2 t3 "
    assert [p.done for p in parts] == [False] * 4 + [True]
    last = parts[-1]
    assert last.eval_count == 4 and last.eval_duration is not None and last.total_duration >= last.eval_duration


def test_an_alias_with_a_tag_names_its_model(client: ollama.Client) -> None:
    answer = client.chat(
        model="deepseek-coder:33b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1}
    )
    assert answer.model == "deepseek-coder:33b" and answer.message.content == "t0"


def test_chat_with_tools_gives_whole_tool_calls(client: ollama.Client) -> None:
    for stream in (False, True):
        result = client.chat(
            model="chatty", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER], stream=stream
        )
        parts = list(result) if stream else [result]
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"ssw_fake": True})]


def test_chat_with_a_json_schema_and_with_think(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"mood": {"type": "string"}}, "required": ["mood"]}
    answer = client.chat(model="chatty", messages=[{"role": "user", "content": "mood?"}], format=schema)
    sent = json.loads(answer.message.content)  # the fake engine names what structured output it was asked for
    assert sent == {"format": "json_schema", "schema": schema}
    answer = client.chat(model="chatty", messages=[{"role": "user", "content": "hm"}], format="json")
    assert json.loads(answer.message.content)["format"] == "json_object"
    answer = client.chat(
        model="chatty", messages=[{"role": "user", "content": "hm"}], think=True, options={"num_predict": 2}
    )
    assert answer.message.thinking == "fake thoughts" and answer.message.content == "t0 t1"


def test_generate_and_embed(client: ollama.Client) -> None:
    answer = client.generate(model="chatty", prompt="once upon", system="be brief", options={"num_predict": 2})
    assert answer.response == "t0 t1" and answer.done
    raw = client.generate(model="chatty", prompt="once upon", raw=True, options={"num_predict": 2})
    assert raw.response == "t0 t1"
    streamed = "".join(
        p.response for p in client.generate(model="chatty", prompt="x", stream=True, options={"num_predict": 2})
    )
    assert streamed == "t0 t1 "
    vectors = client.embed(model="embedder", input=["a", "b"])
    assert len(vectors.embeddings) == 2 and all(len(v) > 0 for v in vectors.embeddings)
    legacy = client.embeddings(model="embedder", prompt="a")
    assert len(legacy.embedding) == len(vectors.embeddings[0])


def test_list_show_and_ps(stack: Stack, client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert {"chatty:latest", "embedder:latest", "slowload:latest", "deepseek-coder:33b"} <= set(listed)
    chatty = listed["chatty:latest"]
    assert chatty.size and chatty.size > 0 and chatty.details.family == "qwen2"
    assert chatty.details.parameter_size and chatty.details.quantization_level
    shown = client.show("chatty")
    assert "completion" in (shown.capabilities or []) and shown.modelinfo
    assert shown.modelinfo["qwen2.context_length"] > 0
    assert "embedding" in (client.show("embedder").capabilities or [])
    client.chat(model="chatty", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1})
    running = {m.model: m for m in client.ps().models}
    assert "chatty:latest" in running and running["chatty:latest"].size_vram
    assert running["chatty:latest"].expires_at is not None


def test_keep_alive_loads_and_unloads_as_ollama_clients_do(stack: Stack, client: ollama.Client) -> None:
    stack.unload("chatty")
    # No messages: the load idiom.
    answer = client.chat(model="chatty", messages=[], keep_alive="10m")
    assert answer.done_reason == "load" and "chatty" in loaded(stack)
    expires = {m.model: m.expires_at for m in client.ps().models}["chatty:latest"]
    assert expires is not None and 500 < (expires.timestamp() - time.time()) <= 600
    # keep_alive 0: the unload idiom (the worker drains, then stops).
    answer = client.chat(model="chatty", messages=[], keep_alive=0)
    assert answer.done_reason == "unload"
    wait_for(lambda: "chatty" not in loaded(stack), 60, "chatty to be unloaded")
    # -1: kept until evicted; a request still works as ever.
    answer = client.chat(
        model="chatty", messages=[{"role": "user", "content": "hi"}], keep_alive=-1, options={"num_predict": 1}
    )
    assert answer.message.content == "t0"
    assert {m.model: m.expires_at for m in client.ps().models}["chatty:latest"].year > 2100


def test_a_request_for_an_unloaded_model_is_held_and_says_how_long_the_load_took(
    stack: Stack, client: ollama.Client
) -> None:
    stack.unload("slowload")
    answer = client.chat(model="slowload", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1})
    assert answer.message.content == "t0"
    worker = next(w for w in stack.status()["workers"] if w["model"] == "slowload")
    load_s = worker["load_marks"]["healthy"] - worker["load_marks"]["requested"]
    assert answer.load_duration is not None
    # What the request waited is the load as the loader measured it, to within a second
    # (the request arrived just before the load was asked for, and saw it ready just after).
    assert abs(answer.load_duration / 1e9 - load_s) < 1.0, (answer.load_duration, load_s)
    assert answer.load_duration / 1e9 >= 2.0  # the engine's cold start alone is 2 s


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "../../etc/passwd", "messages": []}, 404, "not found"),
        ({"model": "nope:7b", "messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
        ({"model": "$(reboot)", "messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
        ({"model": "ssw-worker@chatty.service", "messages": []}, 404, "not found"),
        ({"model": "chatty:" + "x" * 300, "messages": []}, 400, "model must name a model"),
        ({"model": 7, "messages": []}, 400, "model must name a model"),
        ({"model": "chatty", "messages": "hi"}, 400, "messages must be a list"),
        ({"model": "chatty", "messages": [], "options": {"temperature": "hot"}}, 400, "options.temperature"),
        ({"model": "chatty", "messages": [], "options": {"warp": 9}}, 400, "options.warp"),
        ({"model": "chatty", "messages": [], "options": {"num_ctx": 10**9}}, 400, "context length"),
        ({"model": "chatty", "messages": [], "keep_alive": "soon"}, 400, "keep_alive"),
    ],
)
def test_bad_requests_get_4xx_in_ollamas_shape_and_load_nothing(
    stack: Stack, key: str, client: ollama.Client, body: dict, status: int, says: str
) -> None:
    stack.unload("chatty")
    got, _, answer = http("POST", stack.public + "/api/chat", body, {"Authorization": f"Bearer {key}"})
    assert got == status and isinstance(answer["error"], str) and says in answer["error"], answer
    assert "chatty" not in loaded(stack)


def test_an_oversized_body_is_413_in_ollamas_shape(stack: Stack, key: str, client: ollama.Client) -> None:
    big = {"model": "chatty", "messages": [{"role": "user", "content": "x" * 70_000}]}
    got, _, answer = http("POST", stack.public + "/api/chat", big, {"Authorization": f"Bearer {key}"})
    assert got == 413 and "exceeds" in answer["error"], (got, answer)


def test_ignored_options_are_named_in_a_header(stack: Stack, key: str, client: ollama.Client) -> None:
    body = {
        "model": "chatty",
        "messages": [{"role": "user", "content": "x"}],
        "stream": False,
        "options": {"num_predict": 1, "num_gpu": 99, "mirostat": 2},
    }
    got, headers, answer = http("POST", stack.public + "/api/chat", body, {"Authorization": f"Bearer {key}"})
    assert got == 200 and answer["message"]["content"] == "t0"
    assert headers["x-ssw-ignored-options"] == "mirostat,num_gpu"


def test_create_delete_and_pull_are_refused_without_the_right(stack: Stack, key: str, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        client.delete("chatty")
    assert raised.value.status_code == 403 and "deleting a model" in raised.value.error
    with pytest.raises(ollama.ResponseError) as raised:
        client.pull("hf.co/Qwen/Qwen3-0.6B")
    assert raised.value.status_code == 403 and "may not pull" in raised.value.error


def test_a_key_allowed_to_pull_pulls_from_the_hub_with_progress(stack: Stack, client: ollama.Client) -> None:
    puller = ollama.Client(host=stack.public, headers={"Authorization": f"Bearer {stack.add_key('puller', '--pull')}"})
    wait_for(lambda: _works(puller), 30, "the puller's key to be accepted")
    try:
        progress = list(puller.pull("hf.co/acme/tiny", stream=True))
        # A name that is not a hub model's is refused with the form to use.
        with pytest.raises(ollama.ResponseError) as raised:
            puller.pull("llama3.2")
    finally:
        puller._client.close()
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    assert max(p.completed or 0 for p in progress) >= 2_000_000  # the weights, counted as they came
    assert raised.value.status_code == 400 and "hf.co/<owner>/<repo>" in raised.value.error
    wait_for(lambda: "tiny:latest" in {m.model for m in client.list().models}, 30, "the pulled model to be listed")


def test_the_official_javascript_library_works_unmodified(stack: Stack) -> None:
    script = REPO / "tests" / "ollama_js" / "client.mjs"
    assert (script.parent / "node_modules" / "ollama").is_dir(), "bootstrap.sh installs the npm package"
    key = stack.add_key("js-user", "--pull")
    wait_for(
        lambda: http("GET", stack.public + "/api/tags", headers={"Authorization": f"Bearer {key}"})[0] == 200,
        30,
        "the key to be accepted",
    )
    run = subprocess.run(
        ["node", str(script), stack.public, key, "hf.co/acme/tiny-js"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["chat"] == {"content": "t0 t1 t2", "done": True, "eval_count": 3}
    assert out["stream"] == {"content": "t0 t1 t2 t3 ", "parts": 5}
    assert out["tools"] == [["get_weather", {"ssw_fake": True}]]
    assert out["format"]["format"] == "json_schema" and out["think"] == "fake thoughts"
    assert out["generate"] == "t0 t1" and out["embed"] == [out["embed"][0]] * 2 and out["embed"][0] > 0
    assert "chatty:latest" in out["list"] and "completion" in out["show"]
    assert out["load"] == "load" and "chatty:latest" in out["ps"] and out["unload"] == "unload"
    assert out["pull"]["statuses"][0] == "pulling manifest" and out["pull"]["statuses"][-1] == "success"
    assert out["pull"]["completed"] >= 2_000_000
    assert out["missing"]["status"] == 404 and "not found" in out["missing"]["error"]


def test_a_key_barred_from_keep_alive_cannot_unload(stack: Stack, client: ollama.Client) -> None:
    client.chat(model="chatty", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1})
    barred = ollama.Client(
        host=stack.public, headers={"Authorization": f"Bearer {stack.add_key('no-keep', '--no-keep-alive')}"}
    )
    wait_for(lambda: _works(barred), 30, "the barred key to be accepted")
    try:
        with pytest.raises(ollama.ResponseError) as raised:
            barred.chat(model="chatty", messages=[], keep_alive=0)
        # Without keep_alive it is served as any key is.
        assert barred.chat(model="chatty", messages=[{"role": "user", "content": "hi"}]).done
    finally:
        barred._client.close()
    assert raised.value.status_code == 403 and "may not set keep_alive" in raised.value.error
    assert "chatty" in loaded(stack)
