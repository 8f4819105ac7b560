"""Pure decisions: placement, routing, the vLLM command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssw.config import Config, PlacementSettings
from ssw.engine import vllm_argv, worker_unit
from ssw.errors import NoCapacity
from ssw.placement import DeviceView, Policy, Resident, place
from ssw.registry import ModelFacts, ModelSpec
from ssw.routing import RoundRobin
from ssw.vram import VramNeed, vram_need
from ssw.workers import load_phases

GB = 10**9


def need(gb: float, overhead: float = 0.0, source: str = "estimate") -> VramNeed:
    return VramNeed(int(gb * GB), int(overhead * GB), None, source)


def dev(index: int, total: float, used: float = 0, pending: float = 0) -> DeviceView:
    return DeviceView(index, int(total * GB), int(used * GB), int(pending * GB))


def res(unit: str, gpu: int, held: float, last_used: float, evictable: bool = True, cost: float = 30) -> Resident:
    return Resident(unit, (gpu,), int(held * GB), last_used, evictable, cost)


@pytest.mark.parametrize(
    ("gb", "devices", "policy", "chosen"),
    [
        (10, [dev(0, 48), dev(1, 48)], "spread", 0),  # a tie goes to the lowest index
        (10, [dev(0, 48, used=30), dev(1, 48, used=10)], "spread", 1),  # most free wins
        (10, [dev(0, 48, used=5), dev(1, 48, pending=20)], "spread", 0),  # reservations in flight count
        (20, [dev(0, 48, used=20), dev(1, 48, used=30)], "spread", 0),  # memory of any process counts
        (18, [dev(0, 48, used=30)], "spread", 0),  # exactly fits
        (10, [dev(0, 48, used=30), dev(1, 48, used=10)], "pack", 0),  # best fit leaves least over
        (20, [dev(0, 48, used=30), dev(1, 48, used=10)], "pack", 1),  # ...among those that fit
    ],
)
def test_placement_policies(gb: float, devices: list[DeviceView], policy: Policy, chosen: int) -> None:
    plan = place(need(gb), devices, [], policy)
    assert plan.gpus == (chosen,) and plan.evict == () and plan.per_gpu_bytes == int(gb * GB)


def test_overhead_is_added_on_each_gpu() -> None:
    assert place(need(18.4, 0.95), [dev(0, 48)], []).per_gpu_bytes == int(18.4 * GB) + int(0.95 * GB)


def test_eviction_takes_the_least_recently_used_and_never_pinned() -> None:
    devices = [dev(0, 48, used=44), dev(1, 48, used=44)]
    residents = [
        res("pinned-old", 0, 20, last_used=1, evictable=False),
        res("a", 0, 12, last_used=5),
        res("b", 0, 12, last_used=9),
        res("c", 1, 22, last_used=3, evictable=False),
        res("d", 1, 22, last_used=8),
    ]
    plan = place(need(10), devices, residents)
    # One eviction on GPU 0 (a, the least recently used there) or on GPU 1 (d):
    # both free enough; the cheaper and then the longer idle one wins.
    assert plan.evict == ("a",) and plan.gpus == (0,)


def test_eviction_prefers_the_fewest_workers() -> None:
    devices = [dev(0, 48, used=46), dev(1, 48, used=46)]
    residents = [res("a", 0, 6, 1), res("b", 0, 6, 2), res("c", 1, 15, 9)]
    plan = place(need(12), devices, residents)
    assert plan.evict == ("c",) and plan.gpus == (1,)


def test_eviction_prefers_what_is_cheapest_to_bring_back() -> None:
    devices = [dev(0, 48, used=46), dev(1, 48, used=46)]
    residents = [res("slow", 0, 15, 1, cost=120), res("fast", 1, 15, 5, cost=20)]
    assert place(need(12), devices, residents).evict == ("fast",)


def test_lru_order_within_a_gpu_takes_several_when_needed() -> None:
    devices = [dev(0, 48, used=40)]
    residents = [res("new", 0, 10, 30), res("old", 0, 10, 10), res("mid", 0, 10, 20), res("pin", 0, 10, 1, False)]
    assert place(need(25), devices, residents).evict == ("old", "mid")


def test_starting_workers_are_not_evicted() -> None:
    devices = [dev(0, 48, used=0, pending=40)]
    with pytest.raises(NoCapacity):
        place(need(10), devices, [res("loading", 0, 40, 1, evictable=False)])


def test_too_big_for_any_gpu_is_refused_with_numbers() -> None:
    devices = [dev(0, 48, used=10), dev(1, 48, used=30)]
    residents = [res("a", 1, 20, 1)]
    with pytest.raises(NoCapacity) as err:
        place(need(60), devices, residents)
    assert "needs 60.0 GB on one GPU" in err.value.message
    assert "at most 38.0 GB can be freed (GPU 0" in err.value.message
    assert "tensor_parallel" in err.value.message


def test_tensor_parallel_splits_a_model_that_fits_no_gpu() -> None:
    devices = [dev(0, 48, used=10), dev(1, 48, used=2), dev(2, 48, used=40)]
    plan = place(need(60, overhead=1), devices, [], tensor_parallel=True)
    assert plan.gpus == (0, 1) and plan.per_gpu_bytes == int(30 * GB) + int(1 * GB)
    assert plan.tensor_parallel == 2


def test_pinned_replica_gpu_is_respected() -> None:
    devices = [dev(0, 48, used=40), dev(1, 48)]
    assert place(need(5), devices, [], allowed=[0]).gpus == (0,)
    with pytest.raises(NoCapacity):
        place(need(10), devices, [], allowed=[0])


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
    unit = worker_unit(Config(), spec(replicas=2), 2, 8101, (1,), 12 * GB, 48 * GB, 8 * GB)
    assert "--kv-cache-memory-bytes 8000000000" in " ".join(unit.argv)
    assert unit.name == "ssw-worker@qwen3-8b:2.service"
    assert unit.env["CUDA_VISIBLE_DEVICES"] == "1" and unit.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert unit.env["SSW_MODEL"] == "qwen3-8b" and unit.env["SSW_PORT"] == "8101"
    assert unit.env["SSW_REPLICA"] == "2" and unit.env["SSW_VRAM_BYTES"] == str(12 * GB)


def test_tensor_parallel_workers_see_all_their_gpus() -> None:
    unit = worker_unit(Config(), spec(), 1, 8100, (0, 1), 31 * GB, 48 * GB)
    assert unit.env["CUDA_VISIBLE_DEVICES"] == "0,1" and unit.env["SSW_GPU"] == "0,1"
    assert "--tensor-parallel-size 2" in " ".join(unit.argv)


def test_vram_need_prefers_models_yaml_then_measured_then_estimate() -> None:
    settings = PlacementSettings()
    overhead = int(0.95 * GB)
    explicit = vram_need(spec(vram_gb=11.5), settings, measured_bytes=7 * GB)
    assert explicit.source == "models.yaml" and explicit.per_gpu() == int(11.5 * GB) + overhead
    assert explicit.kv_bytes == int(1.5 * GB)  # vram_gb less the weights
    measured = vram_need(spec(), settings, measured_bytes=20 * GB)
    assert measured.source == "measured" and measured.per_gpu() == int(20 * GB * 1.05)
    est = vram_need(spec(max_model_len=16384), settings)
    kv = 2 * 48 * 8 * 128 * 2 * 16384
    assert est.source == "estimate" and est.kv_bytes == kv
    assert est.per_gpu() == 10 * GB + kv + overhead
    assert vram_need(spec(max_model_len=16384), PlacementSettings(kv_cache_sequences=2)).kv_bytes == 2 * kv


@pytest.mark.parametrize(
    ("marks", "expected"),
    [
        ({}, None),  # adopted: this loader did not see the load
        ({"requested": 10.0}, {}),
        (
            {"requested": 10.0, "placed": 10.5, "evicted": 14.5, "unit_started": 14.6},
            {"placement": 0.5, "eviction": 4.0, "unit_start": 0.1},
        ),
        (
            {"requested": 10.0, "placed": 10.5, "evicted": 10.5, "unit_started": 10.6, "bound": 18.6, "healthy": 40.0},
            {
                "placement": 0.5,
                "eviction": 0.0,
                "unit_start": 0.1,
                "process_up": 8.0,
                "engine_ready": 21.4,
                "total": 30.0,
            },
        ),
    ],
)
def test_load_phases_follow_the_marks(marks: dict[str, float], expected: dict[str, float] | None) -> None:
    assert load_phases(marks) == expected
