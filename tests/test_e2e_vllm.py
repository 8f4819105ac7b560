"""The foundation's promise with real vLLM (CPU) as ssw-worker@tiny under real
systemd, reached through the gateway with the official OpenAI client. One
worker for the whole module: it takes about 40 s to start on 2 cores."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = [pytest.mark.systemd, pytest.mark.vllm]

UNIT = "ssw-worker@tiny.service"
CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, tiny_model: Path) -> Iterator[Stack]:
    models = {"tiny": {"path": tiny_model.name, "aliases": ["light"], "vram_gb": 2}}
    s = start_stack(sysbox, WORK_ROOT / f"vllm-stack-{id(sysbox)}", tiny_model.parent, models, "vllm")
    started = time.monotonic()
    status, _, body = http("POST", s.admin + "/load", {"model": "tiny"}, timeout=600)
    print(f"real vLLM worker ready in {time.monotonic() - started:.1f} s")
    assert status == 200, body
    yield s
    http("POST", s.admin + "/unload", {"model": "tiny"}, timeout=120)
    stop_stack(s)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.public + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_list_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "light"}
    assert models["tiny"].model_extra["ssw"]["state"] == "ready"
    assert models["light"].model_extra["ssw"]["alias_of"] == "tiny"


def test_chat_completion_from_real_vllm(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    assert reply.model == "tiny"
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content


def test_streamed_chat_completion_arrives_in_chunks(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert {c.model for c in chunks} == {"tiny"}


def test_alias_resolves_to_its_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="light", messages=CHAT, max_tokens=4)
    assert reply.model == "tiny"


def test_unknown_model_is_404_with_alternatives(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert "tiny" in err.value.message and "light" in err.value.message


def test_worker_unit_is_transient_in_the_slice_with_accounting_and_journal(stack: Stack) -> None:
    props = stack.unit_show(
        UNIT, "Transient", "Slice", "Environment", "MemoryAccounting", "MemoryCurrent", "ActiveState", "ExecStart"
    )
    assert props["Transient"] == "yes"
    assert props["Slice"] == "ssw-workers.slice"
    assert props["ActiveState"] == "active"
    assert "CUDA_VISIBLE_DEVICES=0" in props["Environment"].split()
    assert props["MemoryAccounting"] == "yes"
    print(f"worker MemoryCurrent: {int(props['MemoryCurrent']) / 2**20:.0f} MiB")
    assert int(props["MemoryCurrent"]) > 50 * 2**20  # a real vLLM process, accounted
    assert "vllm.entrypoints.openai.api_server" in props["ExecStart"]
    status = stack.box.systemctl("status", UNIT).stdout
    assert "ssw vLLM worker for tiny" in status and "Active: active (running)" in status
    journal = stack.box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    assert "Application startup complete" in journal


def vllm_metric(sock: str, name: str) -> float:
    families = text_string_to_metric_families(worker_http(sock, "GET", "/metrics")[1])
    values = [sample.value for family in families for sample in family.samples if sample.name == name]
    assert values, f"vLLM exports {name}"
    return sum(values)


def test_a_client_leaving_mid_stream_aborts_the_request_in_vllm(stack: Stack) -> None:
    worker = next(w for w in stack.status()["workers"] if w["unit"] == UNIT)
    n, max_tokens = 4, 900
    before = vllm_metric(worker["socket"], "vllm:generation_tokens_total")

    async def leave_mid_stream() -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                stack.public + "/v1/chat/completions",
                json={
                    "model": "tiny",
                    "messages": CHAT,
                    "max_tokens": max_tokens,
                    "n": n,
                    "stream": True,
                    "ignore_eos": True,
                },
            )
            for _ in range(3):
                await resp.content.readline()
            resp.close()

    asyncio.run(leave_mid_stream())
    # vLLM records an iteration's stats before its tokens reach any client, so
    # the request counted as running before we left; zero now means it is gone.
    wait_for(lambda: vllm_metric(worker["socket"], "vllm:num_requests_running") == 0, 30, "vLLM to drop the request")
    generated = vllm_metric(worker["socket"], "vllm:generation_tokens_total") - before
    print(f"vLLM generated {generated:.0f} of {n * max_tokens} tokens before the abort")
    # Run to the end it would have generated exactly n * max_tokens (ignore_eos).
    assert 0 < generated < n * max_tokens


def test_gateway_and_loader_restarts_keep_the_model_loaded(stack: Stack, client: openai.OpenAI) -> None:
    pid = stack.unit_show(UNIT, "MainPID")["MainPID"]
    stack.gateway.kill(signal.SIGKILL)
    stack.restart(stack.gateway)
    assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4).model == "tiny"

    stack.loader.kill(signal.SIGTERM)
    stack.restart(stack.loader)
    worker = next(w for w in stack.status()["workers"] if w["unit"] == UNIT)
    assert worker["adopted"] is True and worker["state"] == "ready"
    assert client.chat.completions.create(model="light", messages=CHAT, max_tokens=4).model == "tiny"
    # Same process all along: nothing was reloaded.
    assert stack.unit_show(UNIT, "MainPID")["MainPID"] == pid


def test_unload_stops_the_real_worker_and_removes_its_socket(stack: Stack) -> None:
    worker = next(w for w in stack.status()["workers"] if w["unit"] == UNIT)
    status, _, body = http("POST", stack.admin + "/unload", {"model": "tiny"}, timeout=120)
    assert status == 200 and body["stopped"] == [UNIT]
    assert stack.box.systemctl("is-active", UNIT).stdout.strip() == "inactive"
    assert not Path(worker["socket"]).exists()
