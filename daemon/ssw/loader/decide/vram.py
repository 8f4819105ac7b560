"""How much GPU memory a model's worker needs (pure).

per GPU = weights + KV cache (split across tensor-parallel GPUs) + runtime
overhead. The first two come, in order of preference, from models.yaml's
``vram_gb``, from the footprint measured on an earlier run, or from the
estimate: the weight files' real sizes plus a KV cache of
``placement.kv_cache_sequences`` full-length sequences
(2 × layers × KV heads × head dim × dtype bytes per token). The runtime
overhead (CUDA context, activations; ``placement.runtime_overhead_gb``) is
added on each GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssw.config import PlacementSettings

if TYPE_CHECKING:
    from ssw.loader.models.registry import ModelSpec
    from ssw.loader.models.spans import Span

GB = 10**9
DEFAULT_CONTEXT = 8192  # when neither models.yaml nor config.json says
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


@dataclass(frozen=True)
class VramNeed:
    model_bytes: int  # weights + KV cache, divided among tensor-parallel GPUs
    overhead_bytes: int  # on each GPU
    kv_bytes: int | None  # the KV cache vLLM should allocate (None: unknown, let vLLM size it)
    source: str  # "models.yaml", "measured" or "estimate"

    def per_gpu(self, tensor_parallel: int = 1) -> int:
        return math.ceil(self.model_bytes / tensor_parallel) + self.overhead_bytes


def kv_bytes_per_token(spec: ModelSpec) -> int | None:
    f = spec.facts
    if not (f.num_layers and f.num_kv_heads and f.head_dim):
        return None
    # The KV cache stays 16-bit for quantized (AWQ, GPTQ) weights.
    dtype_bytes = max(_DTYPE_BYTES.get((f.dtype or "").lower(), 2), 2)
    return 2 * f.num_layers * f.num_kv_heads * f.head_dim * dtype_bytes


def context_len(spec: ModelSpec) -> int:
    return spec.max_model_len or spec.facts.max_position_embeddings or DEFAULT_CONTEXT


def estimate_kv_bytes(spec: ModelSpec, sequences: int) -> int | None:
    per_token = kv_bytes_per_token(spec)
    return None if per_token is None else per_token * context_len(spec) * sequences


def vram_need(spec: ModelSpec, settings: PlacementSettings, measured_bytes: int | None = None) -> VramNeed:
    overhead = int(settings.runtime_overhead_gb * GB)
    weights = spec.facts.weight_bytes
    if spec.vram_gb is not None:
        total = int(spec.vram_gb * GB)
        kv = total - weights if weights and total > weights else None
        return VramNeed(total, overhead, kv, "models.yaml")
    kv = estimate_kv_bytes(spec, settings.kv_cache_sequences)
    if measured_bytes:
        # A measured footprint already includes the overhead.
        with_margin = int(measured_bytes * (1 + settings.measured_margin))
        return VramNeed(max(with_margin - overhead, 0), overhead, kv, "measured")
    return VramNeed(weights + (kv or 0), overhead, kv, "estimate")


def rank_share(need: VramNeed, span: Span | None) -> VramNeed:
    """What each GPU of a model across hosts holds: its weights and KV cache divided over
    the world of ranks, plus each GPU's own overhead; the need itself on one host."""
    if span is None:
        return need
    world = span.world
    kv = math.ceil(need.kv_bytes / world) if need.kv_bytes else need.kv_bytes
    return VramNeed(math.ceil(need.model_bytes / world), need.overhead_bytes, kv, need.source)
