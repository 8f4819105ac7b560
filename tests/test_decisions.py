"""Pure decisions: placement, routing, the vLLM command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssw.config import Config
from ssw.engine import vllm_argv, worker_unit
from ssw.errors import NoCapacity
from ssw.placement import DeviceView, choose_device
from ssw.registry import ModelFacts, ModelSpec
from ssw.routing import RoundRobin
from ssw.vram import estimate_bytes

GB = 10**9


@pytest.mark.parametrize(
    ("need", "devices", "chosen"),
    [
        (10, [(0, 48, 0, 0), (1, 48, 0, 0)], 0),  # a tie goes to the lowest index
        (10, [(0, 48, 30, 0), (1, 48, 10, 0)], 1),  # most free wins
        (20, [(0, 48, 20, 0), (1, 48, 0, 30)], 0),  # memory of other processes counts
        (18, [(0, 48, 30, 0)], 0),  # exactly fits
    ],
)
def test_choose_device(need: int, devices: list[tuple[int, int, int, int]], chosen: int) -> None:
    views = [DeviceView(i, t * GB, r * GB, o * GB) for i, t, r, o in devices]
    assert choose_device(need * GB, views) == chosen


def test_no_device_fits() -> None:
    with pytest.raises(NoCapacity, match=r"19\.0 GB"):
        choose_device(19 * GB, [DeviceView(0, 48 * GB, 30 * GB, 0)])


def test_round_robin_rotates_and_gives_failover_order() -> None:
    rr = RoundRobin()
    pool = ["a", "b", "c"]
    assert [rr.order("m", pool) for _ in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert rr.order("other", pool)[0] == "a"
    assert rr.order("m", []) == []


def spec(**kw: object) -> ModelSpec:
    facts = ModelFacts(
        num_layers=48,
        num_kv_heads=8,
        head_dim=128,
        dtype="float16",
        weight_bytes=10 * GB,
        max_position_embeddings=32768,
    )
    return ModelSpec(name="qwen3-8b", path=Path("/data/models/Qwen3-8B-AWQ"), facts=facts, **kw)  # type: ignore[arg-type]


def test_argv_is_built_from_registry_and_config_only() -> None:
    cfg = Config()
    s = spec(
        max_model_len=16384,
        tool_call_parser="hermes",
        reasoning_parser=None,
        chat_template_kwargs={"enable_thinking": False},
        extra_args=("--enforce-eager",),
    )
    argv = vllm_argv(cfg, s, 8100, 12 * GB, 48 * GB)
    assert argv[:3] == ["/opt/ssw/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--model /data/models/Qwen3-8B-AWQ --served-model-name qwen3-8b" in joined
    assert "--host 127.0.0.1 --port 8100" in joined
    assert "--gpu-memory-utilization 0.2500" in joined
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in joined
    assert '--default-chat-template-kwargs {"enable_thinking": false}' in joined
    assert argv[-1] == "--enforce-eager"
    # Simulated GPUs have no memory for vLLM to check against.
    assert "--gpu-memory-utilization" not in vllm_argv(cfg, s, 8100, 12 * GB, None)


def test_worker_unit_pins_the_gpu_and_marks_itself() -> None:
    unit = worker_unit(Config(), spec(replicas=2), 2, 8101, 1, 12 * GB, 48 * GB)
    assert unit.name == "ssw-worker@qwen3-8b:2.service"
    assert unit.env["CUDA_VISIBLE_DEVICES"] == "1" and unit.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert unit.env["SSW_MODEL"] == "qwen3-8b" and unit.env["SSW_PORT"] == "8101"
    assert unit.env["SSW_REPLICA"] == "2" and unit.env["SSW_VRAM_BYTES"] == str(12 * GB)


def test_vram_override_wins_over_estimate() -> None:
    assert estimate_bytes(spec(vram_gb=11.5)) == int(11.5 * GB)
    est = estimate_bytes(spec(max_model_len=16384))
    kv = 2 * 48 * 8 * 128 * 2 * 16384
    assert est == 10 * GB + kv + int(1.5 * GB)
