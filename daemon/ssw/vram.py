"""How much GPU memory a model's worker needs (pure).

need = weights + KV cache + runtime overhead, unless models.yaml gives vram_gb.
The KV cache is sized for ``KV_FULL_SEQUENCES`` sequences of the model's
context length: vLLM needs at least one full sequence to start, and a few let
concurrent requests share the cache without preemption.
"""

from __future__ import annotations

from .registry import ModelSpec

GB = 10**9
RUNTIME_OVERHEAD_BYTES = int(1.5 * GB)  # CUDA context, activations, sampler buffers
KV_FULL_SEQUENCES = 1
DEFAULT_CONTEXT = 8192  # when neither models.yaml nor config.json says
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4, "fp8": 1}


def kv_bytes_per_token(spec: ModelSpec) -> int | None:
    f = spec.facts
    if not (f.num_layers and f.num_kv_heads and f.head_dim):
        return None
    # Quantized weights keep a 16-bit KV cache.
    dtype_bytes = _DTYPE_BYTES.get((f.dtype or "").lower(), 2)
    if dtype_bytes < 2:
        dtype_bytes = 2
    return 2 * f.num_layers * f.num_kv_heads * f.head_dim * dtype_bytes


def context_len(spec: ModelSpec) -> int:
    return spec.max_model_len or spec.facts.max_position_embeddings or DEFAULT_CONTEXT


def estimate_bytes(spec: ModelSpec) -> int:
    """The VRAM budget a worker of this model gets."""
    if spec.vram_gb is not None:
        return int(spec.vram_gb * GB)
    per_token = kv_bytes_per_token(spec) or 0
    kv = per_token * context_len(spec) * KV_FULL_SEQUENCES
    return spec.facts.weight_bytes + kv + RUNTIME_OVERHEAD_BYTES
