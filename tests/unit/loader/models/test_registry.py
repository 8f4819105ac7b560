from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ssw.config import Config
from ssw.errors import ConfigError, ModelNotFound
from ssw.loader.models.registry import family_defaults, read_facts, scan
from ssw.loader.systemd.engine import vllm_argv
from tests.conftest import QWEN2_CONFIG, make_model_dir
from tests.harness.stack import REPO


def write_models(path: Path, models: dict) -> Path:
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def test_shipped_models_yaml_has_the_nine_ssw_models(tmp_path: Path) -> None:
    reg = scan(tmp_path, REPO / "models.yaml")
    raw = yaml.safe_load((REPO / "models.yaml").read_text())["models"]
    assert len(raw) == 9
    assert raw["qwen2.5-14b"]["path"] == "Qwen2.5-14B-Instruct-AWQ" and raw["qwen2.5-14b"]["aliases"] == ["heavy"]
    assert raw["qwen3-4b"]["path"] == "Qwen3-4B-AWQ" and raw["qwen3-4b"]["aliases"] == ["light"]
    assert raw["qwen2.5-14b"]["pinned"] and raw["qwen3-4b"]["pinned"]
    assert all(entry.get("vram_gb") for entry in raw.values())
    # No files here: every entry is reported missing and no alias routes anywhere.
    assert set(reg.missing) == set(raw) and reg.aliases == {} and reg.models == {}


def test_discovers_models_and_reads_their_facts(tmp_path: Path) -> None:
    make_model_dir(
        tmp_path / "m" / "plain",
        QWEN2_CONFIG,
        weight_bytes=3000,
        files=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
    )
    make_model_dir(
        tmp_path / "m" / "Org" / "Nested",
        {**QWEN2_CONFIG, "head_dim": 96, "quantization_config": {"quant_method": "awq"}},
    )
    (tmp_path / "m" / "not-a-model").mkdir()
    reg = scan(tmp_path / "m", tmp_path / "absent.yaml")
    assert sorted(reg.models) == ["Org--Nested", "plain"]
    facts = reg.models["plain"].facts
    assert facts.weight_bytes == 3000
    assert (facts.num_layers, facts.num_kv_heads, facts.head_dim) == (2, 2, 64)
    assert facts.model_type == "qwen2" and facts.dtype == "bfloat16"
    nested = reg.models["Org--Nested"].facts
    assert nested.head_dim == 96 and nested.quantization == "awq"


def test_safetensors_index_counts_only_listed_files(tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "m", QWEN2_CONFIG, weight_bytes=2000, files=("a.safetensors", "b.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    assert read_facts(d).weight_bytes == 1000


def test_models_yaml_merges_and_aliases_resolve(tmp_path: Path) -> None:
    make_model_dir(tmp_path / "m" / "Qwen3-8B-AWQ", {**QWEN2_CONFIG, "model_type": "qwen3"})
    models = write_models(
        tmp_path / "models.yaml",
        {
            "qwen3-8b": {
                "path": "Qwen3-8B-AWQ",
                "aliases": ["mid"],
                "pinned": True,
                "vram_gb": 11.5,
                "max_model_len": 8192,
                "extra_args": ["--enforce-eager"],
                "replicas": 2,
            },
            "gone": {"aliases": ["heavy"]},
        },
    )
    reg = scan(tmp_path / "m", models)
    spec = reg.resolve("mid")
    assert spec.name == "qwen3-8b" and spec.pinned and spec.vram_gb == 11.5 and spec.replicas == 2
    assert spec.extra_args == ("--enforce-eager",) and spec.max_model_len == 8192
    assert spec.tool_call_parser == "hermes"
    assert spec.chat_template_kwargs == {"enable_thinking": False}
    # The directory is claimed by its entry, so it is not listed twice.
    assert sorted(reg.models) == ["qwen3-8b"]
    assert reg.missing == {"gone": tmp_path / "m" / "gone"}
    with pytest.raises(ModelNotFound) as err:
        reg.resolve("heavy")
    assert "qwen3-8b" in err.value.message and "mid" in err.value.message


@pytest.mark.parametrize(
    ("name", "config", "expected"),
    [
        ("Qwen2.5-14B-Instruct-AWQ", {"model_type": "qwen2"}, {"tool_call_parser": "hermes"}),
        (
            "Qwen3-4B-AWQ",
            {"model_type": "qwen3"},
            {"tool_call_parser": "hermes", "chat_template_kwargs": {"enable_thinking": False}},
        ),
        ("Llama-3.1-8B-Instruct", {"model_type": "llama"}, {"tool_call_parser": "llama3_json"}),
        ("Mistral-7B-Instruct-v0.2", {"model_type": "mistral"}, {"tool_call_parser": "mistral"}),
        (
            "DeepSeek-R1-Distill-Qwen-14B-uncensored",
            {"model_type": "qwen2"},
            {"tool_call_parser": "hermes", "reasoning_parser": "deepseek_r1"},
        ),
        ("something", {"model_type": "gpt2"}, {}),
    ],
)
def test_family_defaults(tmp_path: Path, name: str, config: dict, expected: dict) -> None:
    d = make_model_dir(tmp_path / name, {**QWEN2_CONFIG, "architectures": [], **config})
    assert family_defaults(name, read_facts(d)) == expected


def test_parsers_can_be_turned_off(tmp_path: Path) -> None:
    make_model_dir(tmp_path / "m" / "q", QWEN2_CONFIG)
    reg = scan(tmp_path / "m", write_models(tmp_path / "y.yaml", {"q": {"tool_call_parser": "none"}}))
    assert reg.models["q"].tool_call_parser is None


def test_a_model_may_run_with_its_own_vllm_environment(tmp_path: Path) -> None:
    for name in ("old", "new", "abs"):
        make_model_dir(tmp_path / "m" / name, QWEN2_CONFIG)
    models = {"new": {"python": "venvs/vllm-next/bin/python"}, "abs": {"python": "/opt/other/bin/python"}}
    reg = scan(tmp_path / "m", write_models(tmp_path / "y.yaml", models))
    cfg = Config()
    argv = {name: vllm_argv(cfg, reg.models[name], 8100, 10**9, None)[0] for name in ("old", "new", "abs")}
    assert argv == {
        "old": str(cfg.vllm.python),
        "new": str(tmp_path / "venvs/vllm-next/bin/python"),  # relative to the models file
        "abs": "/opt/other/bin/python",
    }


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"a;b": {}}, "models.a;b: not a valid model name"),
        ({"a": {"aliases": ["x y"]}}, "models.a.aliases"),
        ({"a": {"path": "../etc"}}, "models.a.path"),
        ({"a": {"replicas": 0}}, "models.a.replicas"),
        ({"a": {"vram": 3}}, "models.a.vram"),
        ({"a": {"aliases": ["b"]}, "b": {}}, "models.a.aliases: 'b' is already a model name"),
        ({"a": {"aliases": ["x"]}, "b": {"aliases": ["x"]}}, "models.b.aliases: 'x' is already an alias"),
    ],
)
def test_models_yaml_errors_name_the_key(tmp_path: Path, models: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        scan(tmp_path, write_models(tmp_path / "models.yaml", models))
    assert message in str(err.value)


def test_unusable_directory_names_are_skipped(tmp_path: Path) -> None:
    make_model_dir(tmp_path / "m" / "bad name!", QWEN2_CONFIG)
    make_model_dir(tmp_path / "m" / "good", QWEN2_CONFIG)
    (tmp_path / "m" / "broken").mkdir()
    (tmp_path / "m" / "broken" / "config.json").write_text("{not json")
    (tmp_path / "m" / "broken" / "model.safetensors").write_bytes(b"x")
    assert sorted(scan(tmp_path / "m", tmp_path / "none.yaml").models) == ["good"]


def test_a_directory_named_like_an_alias_is_skipped_and_the_scan_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_model_dir(tmp_path / "m" / "qwen", QWEN2_CONFIG)
    make_model_dir(tmp_path / "m" / "light", QWEN2_CONFIG)  # say, a pull named after the alias
    models = write_models(tmp_path / "y.yaml", {"qwen": {"aliases": ["light"]}, "absent": {"aliases": ["heavy"]}})
    reg = scan(tmp_path / "m", models)
    assert sorted(reg.models) == ["qwen"] and reg.aliases == {"light": "qwen"}
    assert "'light' is an alias in" in caplog.text
    # Neither alias, even that of a model whose files are absent, may become a model's name.
    assert reg.name_taken("light") and reg.name_taken("heavy") and reg.name_taken("qwen")
    assert reg.name_taken("new-one") is None


def test_a_model_across_hosts_is_checked_against_its_shape(tmp_path: Path) -> None:
    make_model_dir(tmp_path / "m" / "big", QWEN2_CONFIG)  # 2 attention heads, 2 layers
    fine = scan(tmp_path / "m", write_models(tmp_path / "ok.yaml", {"big": {"hosts": 2, "pipeline_parallel_size": 2}}))
    span = fine.models["big"].span
    assert span is not None and (span.tensor_parallel, span.pipeline_parallel) == (1, 2)
    wide = {"big": {"hosts": 2, "gpus_per_host": 2, "tensor_parallel_size": 4}}
    with pytest.raises(ConfigError) as refused:
        scan(tmp_path / "m", write_models(tmp_path / "wide.yaml", wide))
    assert refused.value.message == (
        f"{tmp_path / 'wide.yaml'}: models.big.tensor_parallel_size: its 2 attention heads cannot be split over "
        "tensor_parallel_size 4 (vLLM needs a divisor) (2 hosts × 2 GPU (tensor parallel 4, pipeline parallel 1))"
    )
    deep = {"big": {"hosts": 4, "pipeline_parallel_size": 4}}
    with pytest.raises(ConfigError, match=r"models\.big\.pipeline_parallel_size: its 2 layers cannot fill"):
        scan(tmp_path / "m", write_models(tmp_path / "deep.yaml", deep))
