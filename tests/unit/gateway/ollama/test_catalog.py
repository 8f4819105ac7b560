"""What /api/tags, /api/ps and /api/show list, from the gateway's view."""

from __future__ import annotations

import time

from ssw.common.contract import ModelDetails, ModelView, WorkerView
from ssw.common.states import WorkerState
from ssw.gateway.ollama.catalog import FOREVER, parameter_size, ps, show, tagged, tags, untagged

DETAILS = ModelDetails(
    family="qwen2",
    dtype="bfloat16",
    weight_bytes=3 * 10**9,
    parameters=1_500_000_000,
    context_length=32768,
    modified_at=1.7e9,
    chat_template="{{ messages }}",
)
CHAT = ModelView(capabilities=["chat", "completions"], details=DETAILS, idle_ttl_s=300)


def worker(model: str, idle_s: float, state: WorkerState = WorkerState.READY) -> WorkerView:
    return WorkerView(
        unit=f"ssw-worker@{model}.service",
        model=model,
        replica=1,
        state=state,
        gpus=[0],
        socket="/s",
        vram_budget_bytes=5 * 10**9,
        idle_s=idle_s,
    )


def test_names_carry_a_tag_as_ollama_lists_them() -> None:
    assert tagged("qwen") == "qwen:latest" and tagged("coder:33b") == "coder:33b"
    assert untagged("qwen:latest") == "qwen" and untagged("coder:33b") == "coder:33b"
    assert [parameter_size(n) for n in (1_500_000_000, 7_000_000_000, 350_000_000, None)] == ["1.5B", "7B", "350M", ""]


def test_tags_lists_models_and_aliases_within_a_scope() -> None:
    models = {"a": CHAT, "b": CHAT}
    listed = tags(models, {"coder:33b": "a", "gone": "missing"}, None)["models"]
    assert [m["name"] for m in listed] == ["a:latest", "b:latest", "coder:33b"]
    assert listed[0]["size"] == 3 * 10**9 and listed[0]["details"]["parameter_size"] == "1.5B"
    assert listed[0]["details"]["quantization_level"] == "BFLOAT16" and len(listed[0]["digest"]) == 64
    assert [m["name"] for m in tags(models, {"coder:33b": "a"}, {"b"})["models"]] == ["b:latest"]


def test_ps_gives_what_is_loaded_with_its_vram_and_when_it_expires() -> None:
    now = time.time()
    models = {"a": CHAT, "forever": ModelView(details=DETAILS, idle_ttl_s=-1), "b": CHAT}
    workers = [worker("a", idle_s=100), worker("forever", 0), worker("b", 0, WorkerState.STARTING)]
    listed = {m["name"]: m for m in ps(models, workers, None, now, lambda unit: None)["models"]}
    assert set(listed) == {"a:latest", "forever:latest"}  # a starting worker is not loaded yet
    assert listed["a:latest"]["size_vram"] == 5 * 10**9 and listed["a:latest"]["context_length"] == 32768
    assert listed["forever:latest"]["expires_at"] == FOREVER
    # Idle 100 s of its 300: it expires in about 200 s; a later request through this gateway counts.
    expires = listed["a:latest"]["expires_at"]
    assert expires.startswith(time.strftime("%Y-%m-%dT", time.gmtime(now + 200)))
    later = ps(models, workers, None, now, lambda unit: now)["models"][0]["expires_at"]
    assert later > expires


def test_show_gives_details_capabilities_context_and_template() -> None:
    shown = show("a", CHAT)
    assert shown["template"] == "{{ messages }}" and shown["capabilities"] == ["completion", "tools"]
    assert shown["model_info"] == {
        "general.architecture": "qwen2",
        "general.parameter_count": 1_500_000_000,
        "qwen2.context_length": 32768,
    }
    embedder = ModelView(capabilities=["embeddings"], details=DETAILS)
    assert show("e", embedder)["capabilities"] == ["embedding"]


def test_a_model_with_a_vision_config_shows_vision() -> None:
    seeing = ModelView(capabilities=["chat"], details=DETAILS.model_copy(update={"vision": True}))
    assert show("v", seeing)["capabilities"] == ["completion", "tools", "vision"]
