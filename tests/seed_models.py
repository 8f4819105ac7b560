"""The SSW deployment's seed models as they are on disk: their config.json
(the fields ssw reads, with the published values) and the sizes of their
weight shards. Tests recreate them with sparse files, which cost no disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_QWEN25_14B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}

SEED_MODELS: dict[str, dict[str, Any]] = {
    "Qwen2.5-14B-Instruct-AWQ": {
        "config": {
            **_QWEN25_14B,
            "torch_dtype": "float16",
            "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128},
        },
        "shards": [3_988_016_304, 3_964_175_800, 2_020_851_832],
        "reference_weights_gb": 10.4,
    },
    "Qwen3-4B-AWQ": {
        "config": {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "torch_dtype": "float16",
            "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128},
        },
        "shards": [2_665_187_360],
        "reference_weights_gb": 2.8,
    },
    "Llama-3.1-8B-Instruct": {
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
            "vocab_size": 128256,
            "torch_dtype": "bfloat16",
        },
        "shards": [4_976_698_672, 4_999_802_720, 4_915_916_176, 1_168_138_808],
        "reference_weights_gb": 16.0,
    },
    "DeepSeek-R1-Distill-Qwen-14B-uncensored": {
        "config": {**_QWEN25_14B, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"},
        "shards": [8_709_511_448, 8_707_448_936, 8_574_165_424, 3_548_941_520],
        "reference_weights_gb": 29.6,
    },
}


def make_seed_model(root: Path, name: str) -> Path:
    seed = SEED_MODELS[name]
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(seed["config"]))
    shards = seed["shards"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        files = ["model.safetensors"]
    for file, size in zip(files, shards, strict=True):
        with (d / file).open("wb") as f:
            f.truncate(size)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(shards)}, "weight_map": {f"t{i}": f for i, f in enumerate(files)}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d
