"""The whole stack against real systemd, with the fast fake engine as the
worker binary: the gateway and the loader run as separate processes, workers
are transient units in the disposable systemd host."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, socket_open, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd

MODELS = {
    "alpha": {"path": "fake-a", "aliases": ["light"], "vram_gb": 4},
    "beta": {"path": "fake-b", "vram_gb": 4, "env": {"SSW_FAKE_LOAD_DELAY": "1.5"}},
    "qwen3-x": {"path": "fake-qwen3", "vram_gb": 4},
    "broken": {"path": "fake-broken", "vram_gb": 4, "env": {"SSW_FAKE_FAIL": "exit-on-start"}},
    "ghost": {"path": "not-on-this-host", "aliases": ["heavy"]},
    "gamma": {"path": "fake-a", "vram_gb": 4, "replicas": 2},
}
WAIT = {"X-SSW-Wait": "true"}
CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path) -> Iterator[Stack]:
    # The SSW platform's contract for models that are not loaded: 202 and Retry-After.
    extra = {"gateway": {"not_loaded": "accept"}}
    s = start_stack(sysbox, WORK_ROOT / f"fake-stack-{id(sysbox)}", models_root, MODELS, "fake", extra)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.public + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def ready(stack: Stack, model: str) -> bool:
    return any(w["model"] == model and w["state"] == "ready" for w in stack.status()["workers"])


def test_models_lists_available_models_and_aliases(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"alpha", "light", "beta", "qwen3-x", "broken"} <= ids
    # Configured but absent on this host: neither it nor its alias is offered.
    assert "ghost" not in ids and "heavy" not in ids


def test_unknown_model_is_404_listing_the_alternatives(client: openai.OpenAI) -> None:
    for name in ("no-such-model", "heavy", "../../etc/passwd"):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=name, messages=CHAT)
        body = err.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found"
        assert "alpha" in body["message"] and "light" in body["message"]


def test_unloaded_model_answers_202_with_retry_after_and_loads(stack: Stack) -> None:
    stack.unload("beta")
    status, headers, body = http("POST", stack.public + "/v1/chat/completions", {"model": "beta", "messages": CHAT})
    assert status == 202
    assert int(headers["retry-after"]) > 0
    assert body["status"] == "loading" and body["model"] == "beta"
    wait_for(lambda: ready(stack, "beta"), 30, "beta to become ready")
    status, _, body = http("POST", stack.public + "/v1/chat/completions", {"model": "beta", "messages": CHAT})
    assert status == 200 and body["model"] == "beta"
    # The load, phase by phase: the fake engine binds at once and answers /health
    # after its 1.5 s load delay, so that delay is the engine's phase.
    phases = next(w for w in stack.status()["workers"] if w["model"] == "beta")["load_phases_s"]
    print("beta's load phases:", phases)
    assert list(phases) == ["placement", "eviction", "unit_start", "process_up", "engine_ready", "total"]
    assert all(v >= 0 for v in phases.values())
    assert phases["process_up"] + phases["engine_ready"] >= 1.5
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"), abs=0.01)


def test_wait_header_holds_the_request_and_alias_resolves(stack: Stack, client: openai.OpenAI) -> None:
    stack.unload("alpha")
    reply = client.chat.completions.create(model="light", messages=CHAT, max_tokens=4, extra_headers=WAIT)
    # Asked by alias, answered by the model that served it.
    assert reply.model == "alpha"
    assert reply.choices[0].message.content == "t0 t1 t2 t3"


def test_streaming_is_proxied_chunk_by_chunk(stack: Stack, client: openai.OpenAI) -> None:
    stack.load("alpha")
    chunks = list(client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=5, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "t0 t1 t2 t3 t4 "
    assert {c.model for c in chunks} == {"alpha"}


def test_completions_are_proxied(stack: Stack, client: openai.OpenAI) -> None:
    stack.load("alpha")
    comp = client.completions.create(model="light", prompt="hi", max_tokens=3)
    assert comp.choices[0].text == "t0 t1 t2" and comp.model == "alpha"


def test_unknown_fields_pass_through_unchanged(stack: Stack) -> None:
    stack.load("alpha")
    extra = {"nested": [1, {"x": "y"}], "unicode": "zaż"}
    status, _, body = http(
        "POST", stack.public + "/v1/chat/completions", {"model": "alpha", "messages": CHAT, "ssw_test_extra": extra}
    )
    assert status == 200
    assert body["ssw_echo"]["extra"] == extra


def test_qwen3_gets_thinking_off_unless_the_client_sets_it(stack: Stack) -> None:
    url = stack.public + "/v1/chat/completions"
    _, _, body = http("POST", url, {"model": "qwen3-x", "messages": CHAT}, headers=WAIT)
    assert body["ssw_echo"]["chat_template_kwargs"] == {"enable_thinking": False}
    _, _, body = http(
        "POST",
        url,
        {"model": "qwen3-x", "messages": CHAT, "chat_template_kwargs": {"enable_thinking": True, "other": 1}},
    )
    assert body["ssw_echo"]["chat_template_kwargs"] == {"enable_thinking": True, "other": 1}


def test_bad_bodies_are_4xx_in_openai_shape(stack: Stack) -> None:
    url = stack.public + "/v1/chat/completions"
    for body in (b"not json", b"[1,2]", b'{"messages": []}', b'{"model": 5}', b'{"model": "a;b"}'):
        status, _, answer = http("POST", url, body)
        assert 400 <= status < 500, (body, status, answer)
        assert set(answer["error"]) >= {"message", "type", "code"}


def test_a_failed_load_is_a_503_with_the_reason(stack: Stack) -> None:
    wait_for(lambda: stack.status()["models"]["broken"]["load"]["state"] != "cooling_down", 90, "no cooldown")
    status, _, body = http(
        "POST", stack.public + "/v1/chat/completions", {"model": "broken", "messages": CHAT}, headers=WAIT
    )
    assert status == 503
    assert body["error"]["code"] == "load_failed"
    assert "ssw-worker@broken.service" in body["error"]["message"]
    load = stack.status()["models"]["broken"]["load"]
    # Not its host's fault: refused for a while instead of being retried by every request.
    assert load["state"] == "cooling_down" and load["deadline"] > time.time()
    assert "ssw-worker@broken.service" in load["last_error"]
    assert not any(w["model"] == "broken" for w in stack.status()["workers"])


def test_worker_is_a_transient_unit_in_the_workers_slice(stack: Stack) -> None:
    stack.load("alpha")
    props = stack.unit_show(
        "ssw-worker@alpha.service",
        "Transient",
        "Slice",
        "Environment",
        "MemoryAccounting",
        "CPUAccounting",
        "ActiveState",
        "Type",
        "CollectMode",
        "SyslogIdentifier",
        "LimitNOFILE",
        "LimitNOFILESoft",
        "MainPID",
    )
    assert props["Transient"] == "yes"
    assert props["Slice"] == "ssw-workers.slice"
    assert props["ActiveState"] == "active"
    assert props["MemoryAccounting"] == "yes" and props["CPUAccounting"] == "yes"
    assert props["CollectMode"] == "inactive-or-failed"
    assert props["LimitNOFILE"] == props["LimitNOFILESoft"] == "65536"

    # ... and the process really has it (the box's PIDs differ from this side's),
    # up to what the service manager itself may grant (this sandbox caps it).
    def nofile(limits: str) -> list[int]:
        return next([int(v) for v in line.split()[3:5]] for line in limits.splitlines() if line.startswith("Max open"))

    ceiling = nofile(Path(f"/proc/{stack.box.pid}/limits").read_text())[1]
    granted = nofile(stack.box.run("cat", f"/proc/{props['MainPID']}/limits").stdout)
    print("worker's open-file limit:", granted, "service manager's ceiling:", ceiling)
    assert granted == [min(65536, ceiling)] * 2
    assert min(65536, ceiling) > 1024
    env = dict(item.split("=", 1) for item in props["Environment"].split())
    worker = next(w for w in stack.status()["workers"] if w["unit"] == "ssw-worker@alpha.service")
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, worker["gpus"]))
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["SSW_MODEL"] == "alpha" and env["SSW_SOCKET"] == worker["socket"]
    journal = stack.box.run("journalctl", "-u", "ssw-worker@alpha.service", "--no-pager", "-o", "cat").stdout
    assert "fake engine for" in journal
    lines = http("GET", stack.admin + "/logs/light?lines=20")[2]["lines"]
    assert any("fake engine for" in line for line in lines)


def test_gateway_killed_and_restarted_keeps_the_worker(stack: Stack, client: openai.OpenAI) -> None:
    stack.load("alpha")
    pid = stack.unit_show("ssw-worker@alpha.service", "MainPID")["MainPID"]
    assert stack.gateway.kill(signal.SIGKILL) == -signal.SIGKILL
    try:
        assert stack.unit_show("ssw-worker@alpha.service", "ActiveState")["ActiveState"] == "active"
    finally:
        stack.restart(stack.gateway)
    reply = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=2)
    assert reply.choices[0].message.content == "t0 t1"
    assert stack.unit_show("ssw-worker@alpha.service", "MainPID")["MainPID"] == pid


def test_loader_killed_and_restarted_adopts_the_worker(stack: Stack, client: openai.OpenAI) -> None:
    stack.load("alpha")
    pid = stack.unit_show("ssw-worker@alpha.service", "MainPID")["MainPID"]
    stack.loader.kill(signal.SIGKILL)
    try:
        # While the loader is away the gateway serves the workers it knows.
        reply = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=2)
        assert reply.choices[0].message.content == "t0 t1"
    finally:
        stack.restart(stack.loader)
    workers = {w["unit"]: w for w in stack.status()["workers"]}
    assert workers["ssw-worker@alpha.service"]["adopted"] is True
    assert workers["ssw-worker@alpha.service"]["state"] == "ready"
    reply = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=2)
    assert reply.choices[0].message.content == "t0 t1"
    assert stack.unit_show("ssw-worker@alpha.service", "MainPID")["MainPID"] == pid


def test_unload_stops_the_unit_and_removes_its_socket(stack: Stack) -> None:
    stack.load("alpha")
    worker = next(w for w in stack.status()["workers"] if w["model"] == "alpha")
    assert socket_open(worker["socket"])
    status, _, body = http("POST", stack.admin + "/unload", {"model": "light"})
    assert status == 200 and body["stopped"] == ["ssw-worker@alpha.service"]
    assert stack.box.systemctl("is-active", "ssw-worker@alpha.service").stdout.strip() == "inactive"
    assert not Path(worker["socket"]).exists()
    assert not any(w["model"] == "alpha" for w in stack.status()["workers"])


def test_unloading_an_unknown_model_is_a_clear_404(stack: Stack) -> None:
    status, _, body = http("POST", stack.admin + "/unload", {"model": "no-such-model"})
    assert status == 404 and "no-such-model" in body["error"]["message"]
    cli = stack.cli("unload", "no-such-model")
    assert cli.returncode == 4
    assert cli.stderr.startswith("ssw: ") and len(cli.stderr.strip().splitlines()) == 1


def test_replicas_get_distinct_units_and_share_requests_round_robin(stack: Stack) -> None:
    status, _, body = http("POST", stack.admin + "/load", {"model": "gamma"})
    assert status == 200
    units = sorted(w["unit"] for w in body["workers"])
    assert units == ["ssw-worker@gamma.service", "ssw-worker@gamma:2.service"]
    sockets = set()
    for _ in range(4):
        _, _, answer = http("POST", stack.public + "/v1/chat/completions", {"model": "gamma", "messages": CHAT})
        sockets.add(answer["ssw_echo"]["socket"])
    assert sockets == {w["socket"] for w in body["workers"]}
    assert stack.box.systemctl("is-active", *units).stdout.split() == ["active", "active"]
    status, _, body = http("POST", stack.admin + "/unload", {"model": "gamma"})
    assert sorted(body["stopped"]) == units
