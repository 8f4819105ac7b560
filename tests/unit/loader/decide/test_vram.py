"""VRAM needs of the seed models, from their real config.json and weight sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssw.config import PlacementSettings
from ssw.loader.decide.placement import DeviceView, place
from ssw.loader.decide.vram import GB, kv_bytes_per_token, vram_need
from ssw.loader.models.registry import scan
from tests.harness.stack import REPO
from tests.seed_models import SEED_MODELS, make_seed_model
from tests.unit.loader.systemd.test_engine import spec as engine_spec


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_weight_estimate_within_ten_percent_of_reference(tmp_path: Path, name: str) -> None:
    make_seed_model(tmp_path, name)
    spec = scan(tmp_path, tmp_path / "none.yaml").models[name]
    reference = SEED_MODELS[name]["reference_weights_gb"] * GB
    print(f"{name}: weights {spec.facts.weight_bytes / GB:.2f} GB (reference {reference / GB:.1f} GB)")
    assert abs(spec.facts.weight_bytes - reference) / reference <= 0.10


def test_kv_cache_per_token_follows_the_architecture(tmp_path: Path) -> None:
    for name in ("Qwen2.5-14B-Instruct-AWQ", "Qwen3-4B-AWQ"):
        make_seed_model(tmp_path, name)
    reg = scan(tmp_path, tmp_path / "none.yaml")
    # 2 (K and V) x layers x KV heads x head dim x 2 bytes (fp16)
    assert kv_bytes_per_token(reg.models["Qwen2.5-14B-Instruct-AWQ"]) == 2 * 48 * 8 * 128 * 2
    assert kv_bytes_per_token(reg.models["Qwen3-4B-AWQ"]) == 2 * 36 * 8 * 128 * 2
    est = vram_need(reg.models["Qwen3-4B-AWQ"], PlacementSettings())
    assert est.source == "estimate"
    assert est.per_gpu() == est.model_bytes + int(0.95 * GB)
    print(f"Qwen3-4B-AWQ estimate: {est.per_gpu() / GB:.1f} GB at its full 40960-token context")


def test_shipped_models_yaml_reproduces_the_reference_layout(tmp_path: Path) -> None:
    for name in ("Qwen2.5-14B-Instruct-AWQ", "Qwen3-4B-AWQ"):
        make_seed_model(tmp_path, name)
    reg = scan(tmp_path, REPO / "models.yaml")
    heavy, light = reg.resolve("heavy"), reg.resolve("light")
    settings = PlacementSettings()
    assert vram_need(heavy, settings).model_bytes == int(18.4 * GB)
    assert vram_need(light, settings).model_bytes == int(6.8 * GB)
    devices = {0: DeviceView(0, 48 * GB, 0, 0), 1: DeviceView(1, 48 * GB, 0, 0)}
    for spec in (heavy, light):
        for replica in range(1, spec.replicas + 1):
            assert spec.gpus is not None
            gpu = spec.gpus[(replica - 1) % len(spec.gpus)]
            plan = place(vram_need(spec, settings), list(devices.values()), [], allowed=[gpu])
            d = devices[gpu]
            devices[gpu] = DeviceView(gpu, d.total, d.used + plan.per_gpu_bytes, 0)
    for d in devices.values():
        print(f"GPU {d.index}: {d.free / GB:.2f} GB free")
        assert abs(d.free - 20.9 * GB) < 0.05 * GB


def test_vram_need_prefers_models_yaml_then_measured_then_estimate() -> None:
    settings = PlacementSettings()
    overhead = int(0.95 * GB)
    explicit = vram_need(engine_spec(vram_gb=11.5), settings, measured_bytes=7 * GB)
    assert explicit.source == "models.yaml" and explicit.per_gpu() == int(11.5 * GB) + overhead
    assert explicit.kv_bytes == int(1.5 * GB)  # vram_gb less the weights
    measured = vram_need(engine_spec(), settings, measured_bytes=20 * GB)
    assert measured.source == "measured" and measured.per_gpu() == int(20 * GB * 1.05)
    est = vram_need(engine_spec(max_model_len=16384), settings)
    kv = 2 * 48 * 8 * 128 * 2 * 16384
    assert est.source == "estimate" and est.kv_bytes == kv
    assert est.per_gpu() == 10 * GB + kv + overhead
    assert vram_need(engine_spec(max_model_len=16384), PlacementSettings(kv_cache_sequences=2)).kv_bytes == 2 * kv
