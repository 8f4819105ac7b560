"""LoRA adapters as models, on real systemd with the fake engine's runtime LoRA
API: an adapter directory is a model served by its base's workers, loaded on
demand (once however many ask), the least recently used one unloaded when the
worker holds max_loras; aliases and metrics work for adapters; an adapter is
never answered by the bare base model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]


def make_adapter(path: Path, base: str, rank: int = 8) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = {"base_model_name_or_path": base, "r": rank, "lora_alpha": 16, "peft_type": "LORA"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 1024)


@pytest.fixture(scope="module")
def stack(sysbox: SysBox) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"adapters-models-{id(sysbox)}"
    make_model_dir(models_dir / "tiny-base", QWEN2_CONFIG)
    make_adapter(models_dir / "lora-a", "acme/tiny-base")  # the hub id's last part names the directory
    make_adapter(models_dir / "lora-b", "tiny-base", rank=16)
    make_adapter(models_dir / "lora-c", "somewhere/else")  # models.yaml names its base
    make_adapter(models_dir / "orphan", "no-such-base")
    make_adapter(models_dir / "lora-gone", "tiny-base")  # its files go away after the scan
    models = {
        "tiny-base": {"max_loras": 2},
        "lora-c": {"base": "tiny-base", "aliases": ["c"]},
        "lora-gone": {"fallbacks": ["lora-b"]},
    }
    extra = {"auth": {"enabled": True}}
    s = start_stack(sysbox, WORK_ROOT / f"adapters-{id(sysbox)}", models_dir, models, "fake", extra)
    KEYS["all"] = s.add_key("all")
    KEYS["only-a"] = s.add_key("only-a", "--models", "lora-a")
    wait_for(lambda: http("GET", s.public + "/v1/models", headers=auth("all"))[0] == 200, 10, "the keys")
    yield s
    stop_stack(s)


KEYS: dict[str, str] = {}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"}


def chat(stack: Stack, model: str, key: str = "all", **headers: str) -> tuple[int, Any]:
    status, _, body = http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 2},
        headers={"X-SSW-Wait": "true", **auth(key), **headers},
        timeout=60,
    )
    return status, body


def chat_full(stack: Stack, model: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    return http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 2},
        headers={"X-SSW-Wait": "true", **auth("all"), **headers},
        timeout=60,
    )


def base_worker(stack: Stack) -> dict[str, Any]:
    (worker,) = [w for w in stack.status()["workers"] if w["model"] == "tiny-base"]
    return worker


def test_adapters_are_models_listed_with_their_base(stack: Stack) -> None:
    listed = {m["id"]: m for m in http("GET", stack.public + "/v1/models", headers=auth("all"))[2]["data"]}
    assert {"tiny-base", "lora-a", "lora-b", "lora-c", "c"} <= set(listed)
    assert listed["lora-a"]["ssw"]["base"] == "tiny-base" and listed["lora-c"]["ssw"]["base"] == "tiny-base"
    assert "base" not in listed["tiny-base"]["ssw"]
    assert "orphan" not in listed  # no base on this host: left out, with a log line
    assert "adapter orphan" in stack.loader.log() and "no base model for 'no-such-base'" in stack.loader.log()
    assert "orphan" in stack.status()["missing"]


def test_an_adapter_is_served_by_a_base_worker_with_lora_on(stack: Stack) -> None:
    status, body = chat(stack, "lora-a")
    assert status == 200 and body["model"] == "lora-a"
    assert body["ssw_echo"]["lora"] == "lora-a"  # the adapter answered, not the bare base
    worker = base_worker(stack)
    exec_start = stack.unit_show(worker["unit"], "ExecStart")["ExecStart"]
    # Rank 16 (lora-b) is the largest present; max_loras from models.yaml.
    assert "--enable-lora --max-loras 2 --max-lora-rank 16" in exec_start
    assert "lora-a" in worker["adapters"]
    assert "adapters lora-a" in stack.cli("status").stdout
    status, body = chat(stack, "tiny-base")
    assert status == 200 and body["ssw_echo"]["lora"] is None


def test_the_least_recently_used_adapter_makes_room_at_max_loras(stack: Stack) -> None:
    for model in ("lora-a", "lora-b", "lora-a"):
        assert chat(stack, model)[0] == 200
    assert sorted(base_worker(stack)["adapters"]) == ["lora-a", "lora-b"]
    status, body = chat(stack, "c")  # an alias of an adapter
    assert status == 200 and body["model"] == "lora-c" and body["ssw_echo"]["lora"] == "lora-c"
    unit = base_worker(stack)["unit"]
    assert sorted(base_worker(stack)["adapters"]) == ["lora-a", "lora-c"]
    assert f"{unit}: adapter lora-b unloaded (least recently used; max_loras 2)" in stack.loader.log()
    status, body = chat(stack, "lora-b")  # loaded again on demand, never answered by the base
    assert status == 200 and body["ssw_echo"]["lora"] == "lora-b"


def test_many_requests_for_an_adapter_load_it_once(stack: Stack) -> None:
    http("POST", stack.admin + "/unload", {"model": "lora-a"})
    wait_for(lambda: "lora-a" not in base_worker(stack)["adapters"], 10, "lora-a to be unloaded")
    unit = base_worker(stack)["unit"]
    before = stack.loader.log().count(f"{unit}: adapter lora-a loaded")
    results: list[Any] = []

    def one() -> None:
        results.append(chat(stack, "lora-a"))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [s for s, _ in results] == [200] * 10
    assert all(b["ssw_echo"]["lora"] == "lora-a" for _, b in results)
    assert stack.loader.log().count(f"{unit}: adapter lora-a loaded") == before + 1


def test_requests_for_adapters_are_counted_under_the_adapters_name(stack: Stack) -> None:
    assert chat(stack, "lora-b")[0] == 200
    metrics = http("GET", stack.gateway_metrics + "/metrics")[2]
    assert 'ssw_requests_total{model="lora-b",route="/v1/chat/completions",status="200"}' in metrics


def test_a_key_scoped_to_an_adapter_reaches_it_and_not_its_base(stack: Stack) -> None:
    status, body = chat(stack, "lora-a", key="only-a")
    assert status == 200 and body["ssw_echo"]["lora"] == "lora-a"
    for model in ("tiny-base", "lora-b"):
        assert chat(stack, model, key="only-a")[0] == 403
    listed = [m["id"] for m in http("GET", stack.public + "/v1/models", headers=auth("only-a"))[2]["data"]]
    assert listed == ["lora-a"]


def test_an_adapter_that_cannot_load_falls_back_to_another_adapter(stack: Stack) -> None:
    gone = Path(stack.status()["models"]["lora-gone"]["path"])
    (gone / "adapter_config.json").unlink()  # the engine refuses it now
    assert chat(stack, "lora-b")[0] == 200  # fallbacks are models that are ready
    status, headers, body = chat_full(stack, "lora-gone", **{"X-SSW-Fallback": "true"})
    assert status == 200 and body["model"] == "lora-b" and body["ssw_echo"]["lora"] == "lora-b"
    assert headers["x-ssw-fallback-from"] == "lora-gone"
    status, _, body = chat_full(stack, "lora-gone", **{"X-SSW-Fallback": "false"})
    assert status == 503 and "No adapter found" in body["error"]["message"]
