"""What a request for a model that is not ready gets, as the official OpenAI
SDK sees it (sync, async, stream) in each gateway.not_loaded mode: never a 2xx
without choices, never an empty stream without an error. Held streams start
at once and get SSE comments while their model loads. Real systemd, the fake
engine; each API key has its own mode."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
LOAD_S = 1.5
MODELS = {
    "loady": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": str(LOAD_S)}},
    "broken": {"path": "fake-b", "vram_gb": 2, "env": {"SSW_FAKE_FAIL": "exit-on-start", "SSW_FAKE_LOAD_DELAY": "1"}},
}
MODES = ("wait", "accept", "unavailable")


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path) -> Iterator[Stack]:
    extra = {
        "auth": {"enabled": True},
        "gateway": {"keepalive_s": 0.3},
        "placement": {"failed_load_cooldown_s": 1},
    }
    s = start_stack(sysbox, WORK_ROOT / f"notloaded-{id(sysbox)}", models_root, MODELS, "fake", extra)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, str]:
    out = {}
    for mode in MODES:
        out[mode] = stack.add_key(mode, "--not-loaded", mode)
    wait_for(lambda: http("GET", stack.public + "/v1/models", headers=auth(out["wait"]))[0] == 200, 10, "the keys")
    return out


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sdk(stack: Stack, key: str, **kw: object) -> openai.OpenAI:
    """An official client, as an application makes one (close it: `with sdk(...) as c`)."""
    return openai.OpenAI(base_url=stack.public + "/v1", api_key=key, timeout=60, **kw)  # type: ignore[arg-type]


def test_wait_the_sdk_just_sees_a_slower_answer(stack: Stack, keys: dict[str, str]) -> None:
    key = keys["wait"]
    stack.unload("loady")
    with sdk(stack, key, max_retries=0) as client:
        reply = client.chat.completions.create(model="loady", messages=CHAT, max_tokens=3)
    assert reply.choices and reply.choices[0].message.content == "t0 t1 t2"
    stack.unload("loady")

    async def async_call() -> str | None:
        async with openai.AsyncOpenAI(base_url=stack.public + "/v1", api_key=key, max_retries=0) as client:
            answer = await client.chat.completions.create(model="loady", messages=CHAT, max_tokens=2)
            return answer.choices[0].message.content

    assert asyncio.run(async_call()) == "t0 t1"
    stack.unload("loady")
    with sdk(stack, key, max_retries=0) as client:
        chunks = list(client.chat.completions.create(model="loady", messages=CHAT, max_tokens=4, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 t3 "


def test_a_held_stream_starts_at_once_and_gets_keepalives(stack: Stack, keys: dict[str, str]) -> None:
    stack.unload("loady")

    async def raw_stream() -> tuple[int, float, list[bytes]]:
        started = time.monotonic()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                stack.public + "/v1/chat/completions",
                json={"model": "loady", "messages": CHAT, "max_tokens": 2, "stream": True},
                headers=auth(keys["wait"]),
            ) as resp,
        ):
            first = time.monotonic() - started
            return resp.status, first, [line async for line in resp.content]

    status, first, lines = asyncio.run(raw_stream())
    comments = [line for line in lines if line.startswith(b":")]
    print(f"held stream: headers after {first:.2f} s, {len(comments)} keep-alive comments during a {LOAD_S} s load")
    assert status == 200 and first < LOAD_S
    assert comments and lines.index(comments[0]) < lines.index(next(x for x in lines if x.startswith(b"data: {")))
    assert lines[-2].strip() == b"data: [DONE]" or lines[-1].strip() == b"data: [DONE]"


def test_a_held_stream_whose_load_fails_ends_with_an_error_event(stack: Stack, keys: dict[str, str]) -> None:
    wait_for(lambda: stack.status()["models"]["broken"]["load"]["state"] != "cooling_down", 10, "no cooldown")
    stream = sdk(stack, keys["wait"], max_retries=0).chat.completions.create(model="broken", messages=CHAT, stream=True)
    with pytest.raises(openai.APIError) as err:
        list(stream)
    assert "failing on purpose" in str(err.value.message)


@pytest.mark.parametrize("mode", ["accept", "unavailable"])
def test_the_sdk_never_gets_a_2xx_without_choices(stack: Stack, keys: dict[str, str], mode: str) -> None:
    key = keys[mode]
    for call in ("sync", "async", "stream"):
        stack.unload("loady")
        with sdk(stack, key, max_retries=0) as client, pytest.raises(openai.APIStatusError) as err:
            if call == "sync":
                client.chat.completions.create(model="loady", messages=CHAT)
            elif call == "stream":
                list(client.chat.completions.create(model="loady", messages=CHAT, stream=True))
            else:

                async def async_call() -> None:
                    async with openai.AsyncOpenAI(base_url=stack.public + "/v1", api_key=key, max_retries=0) as c:
                        await c.chat.completions.create(model="loady", messages=CHAT)

                asyncio.run(async_call())
        assert err.value.status_code == 503 and err.value.code == "model_loading", (call, err.value)
        assert int(err.value.response.headers["retry-after"]) >= 1


def test_accept_gives_other_clients_202_and_retry_after(stack: Stack, keys: dict[str, str]) -> None:
    stack.unload("loady")
    status, headers, body = http(
        "POST", stack.public + "/v1/chat/completions", {"model": "loady", "messages": CHAT}, auth(keys["accept"])
    )
    assert status == 202 and int(headers["retry-after"]) >= 1
    assert body["status"] == "loading" and body["model"] == "loady"


def test_the_sdk_with_its_default_retries_gets_the_answer_once_the_load_time_is_known(
    stack: Stack, keys: dict[str, str]
) -> None:
    # Once a load was measured, Retry-After says about LOAD_S: the SDK waits that, then succeeds.
    assert http("POST", stack.admin + "/load", {"model": "loady"})[0] == 200
    stack.unload("loady")
    with sdk(stack, keys["unavailable"]) as client:
        reply = client.chat.completions.create(model="loady", messages=CHAT, max_tokens=2)
    assert reply.choices[0].message.content == "t0 t1"


def test_x_ssw_wait_on_a_request_wins_over_the_keys_mode(stack: Stack, keys: dict[str, str]) -> None:
    stack.unload("loady")
    with sdk(stack, keys["unavailable"], max_retries=0, default_headers={"X-SSW-Wait": "true"}) as client:
        assert client.chat.completions.create(model="loady", messages=CHAT, max_tokens=1).choices
    stack.unload("loady")
    with (
        sdk(stack, keys["wait"], max_retries=0, default_headers={"X-SSW-Wait": "false"}) as client,
        pytest.raises(openai.APIStatusError) as err,
    ):
        client.chat.completions.create(model="loady", messages=CHAT)
    assert err.value.status_code == 503


def test_a_held_request_whose_client_left_is_dropped_not_relayed(stack: Stack, keys: dict[str, str]) -> None:
    """Clients that give up while their model loads leave the queue at once, and the
    worker never sees their requests; the one that stayed is served."""
    stack.unload("loady")
    body = json.dumps({"model": "loady", "messages": CHAT, "max_tokens": 2}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys['wait']}\r\n"
        f"Content-Type: application/json\r\nX-SSW-Wait: true\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(stack.public.rsplit(":", 1)[1])
    leavers = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    for s in leavers:
        s.sendall(head + body)
    held = lambda: http("GET", stack.public + "/health")[2]["waiting"].get("loady")  # noqa: E731
    wait_for(lambda: held() == 4, 10, "4 held requests")
    for s in leavers:
        s.close()
    wait_for(
        lambda: not http("GET", stack.public + "/health")[2]["waiting"].get("loady"), 5, "the held requests dropped"
    )
    status, _, answer = http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": "loady", "messages": CHAT, "max_tokens": 2},
        headers={**auth(keys["wait"]), "X-SSW-Wait": "true"},
        timeout=60,
    )
    assert status == 200 and answer["choices"][0]["message"]["content"] == "t0 t1"
    worker = next(w for w in stack.status()["workers"] if w["model"] == "loady")
    seen = worker_http(worker["socket"], "GET", "/ssw-fake/seen")[1]
    assert [p for p in seen if p.endswith("/v1/chat/completions")] == ["POST /v1/chat/completions"]  # the stayer's
    # Each is accounted as the client leaving, not as an error of ssw's or the worker's.
    wait_for(lambda: stack.gateway.log().count("error=client_disconnected") >= 4, 10, "four 499s in the access log")
