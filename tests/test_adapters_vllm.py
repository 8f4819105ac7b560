"""A LoRA adapter served on real vLLM on the CPU: a tiny random adapter made
locally with peft for the tiny model, loaded at run time into the base's
worker (--enable-lora), answering differently from the bare base."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import REPO, VLLM_VENV, WORK_ROOT, http
from tests.harness.sysbox import SysBox

pytestmark = [pytest.mark.systemd, pytest.mark.vllm]


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, tiny_model: Path) -> Iterator[Stack]:
    models_dir = WORK_ROOT / "adapters-vllm-models"
    models_dir.mkdir(parents=True, exist_ok=True)
    if not (models_dir / "tiny-qwen").exists():
        (models_dir / "tiny-qwen").symlink_to(tiny_model)
    subprocess.run(
        [
            str(VLLM_VENV / "bin/python"),
            str(REPO / "tests/harness/make_tiny_adapter.py"),
            str(tiny_model),
            str(models_dir / "tiny-lora"),
        ],
        check=True,
        capture_output=True,
    )
    models = {"tiny": {"path": "tiny-qwen", "vram_gb": 2}}
    s = start_stack(sysbox, WORK_ROOT / f"adapters-vllm-{id(sysbox)}", models_dir, models, "vllm")
    yield s
    stop_stack(s)


def complete(stack: Stack, model: str) -> tuple[int, Any]:
    status, _, body = http(
        "POST",
        stack.public + "/v1/completions",
        {"model": model, "prompt": "hello", "max_tokens": 6, "temperature": 0},
        headers={"X-SSW-Wait": "true"},
        timeout=600,
    )
    return status, body


def test_a_lora_adapter_on_real_vllm_answers_as_itself(stack: Stack) -> None:
    listed = {m["id"]: m for m in http("GET", stack.public + "/v1/models")[2]["data"]}
    assert listed["tiny-lora"]["ssw"]["base"] == "tiny"
    started = time.monotonic()
    status, adapted = complete(stack, "tiny-lora")  # loads the base with LoRA on, then the adapter
    print(f"adapter served {time.monotonic() - started:.1f} s after the first request (base cold start included)")
    assert status == 200, adapted
    assert adapted["model"] == "tiny-lora"
    status, bare = complete(stack, "tiny")
    assert status == 200 and bare["model"] == "tiny"
    # The adapter's random weights change what the model says: it was not the bare base.
    assert adapted["choices"][0]["text"] != bare["choices"][0]["text"]
    print(f"base: {bare['choices'][0]['text']!r}, adapter: {adapted['choices'][0]['text']!r}")
    (worker,) = [w for w in stack.status()["workers"] if w["model"] == "tiny"]
    assert worker["adapters"] == ["tiny-lora"]
    exec_start = stack.unit_show(worker["unit"], "ExecStart")["ExecStart"]
    assert "--enable-lora --max-loras 1 --max-lora-rank 8" in exec_start
