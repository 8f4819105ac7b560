"""The schema of ``models.yaml``: what an operator may say about each model and
each A/B split (validated; an error names the failing key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ssw.common.contract import ALIAS_RE, valid_alias
from ssw.loader.models.spans import MAX_HOSTS, Span, make_span


class ModelOverride(BaseModel):
    """One entry of models.yaml. Unset fields fall back to facts and family defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(default=None, description="Directory under models_dir (default: the model's name).")
    aliases: list[str] = Field(default_factory=list, description="Other names clients may use.")
    pinned: bool = Field(default=False, description="Loaded at start, never evicted, always restarted.")
    vram_gb: float | None = Field(
        default=None, gt=0, description="VRAM the worker may use, in GB; wins over estimates."
    )
    max_model_len: int | None = Field(default=None, gt=0, description="vLLM --max-model-len.")
    max_num_seqs: int | None = Field(default=None, gt=0, description="vLLM --max-num-seqs (concurrency).")
    tool_call_parser: str | None = Field(default=None, description="Tool-call parser; 'none' turns the default off.")
    reasoning_parser: str | None = Field(default=None, description="Reasoning parser; 'none' turns the default off.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Defaults the gateway adds to chat requests unless the client set them."
    )
    extra_args: list[str] = Field(default_factory=list, description="More vLLM arguments for this model.")
    replicas: int = Field(default=1, ge=1, le=16, description="Workers to run for this model.")
    max_tokens: int | None = Field(
        default=None, gt=0, description="The largest max_tokens a request may ask of this model (400 beyond)."
    )
    gpus: list[int] | None = Field(
        default=None, description="GPU of each replica, in order (cycled); default: placement decides."
    )
    fallbacks: list[str] = Field(
        default_factory=list, description="Models or aliases that may serve when this one cannot."
    )
    fallback_default: bool = Field(
        default=False, description="Use the fallbacks without the client asking (X-SSW-Fallback: true)."
    )
    runner: Literal["auto", "generate", "pooling"] = Field(
        default="auto",
        description="vLLM --runner: 'pooling' serves a generative architecture as an embedding or "
        "classification model (with convert); auto: as vLLM decides from the architecture.",
    )
    convert: Literal["auto", "none", "embed", "classify"] = Field(
        default="auto", description="vLLM --convert: how a pooling runner adapts the model (embed, classify)."
    )
    scheduling_policy: Literal["fcfs", "priority"] | None = Field(
        default=None, description="vLLM --scheduling-policy; 'priority' passes X-SSW-Priority on to vLLM."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment for this model's workers.")
    sleep: Literal["auto"] | bool = Field(
        default="auto",
        description="Start workers with vLLM's sleep mode, so that eviction and idle_ttl_s put them to sleep "
        "instead of stopping them; auto: on GPU hosts (NVML), off on the CPU, where vLLM refuses it. Pinned "
        "models sleep only when this is true.",
    )
    idle_ttl_s: float | None = Field(
        default=None, gt=0, description="After this long without a request its workers sleep (or stop)."
    )
    preload: bool = Field(default=False, description="Loaded when the loader starts; unlike pinned, may be evicted.")
    enforce_eager: bool | None = Field(
        default=None, description="vLLM --enforce-eager: no CUDA graphs or torch.compile; starts faster, serves slower."
    )
    load_format: str | None = Field(
        default=None, description="vLLM --load-format (e.g. 'safetensors', 'runai_streamer', 'fastsafetensors')."
    )
    compilation_config: dict[str, Any] | None = Field(
        default=None, description="vLLM --compilation-config (e.g. {level: 0} to skip compilation)."
    )
    base: str | None = Field(
        default=None,
        description="For a LoRA adapter: the model whose workers serve it (default: from its adapter_config.json).",
    )
    max_loras: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="For a base model: adapters loaded at once per worker (vLLM --max-loras).",
    )
    max_lora_rank: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="For a base model: the largest adapter rank (default: from the adapters).",
    )
    hosts: int = Field(
        default=1,
        ge=1,
        le=MAX_HOSTS,
        description="Hosts of the fleet one worker of this model spans (vLLM's multi-node backend); 1: one host.",
    )
    tensor_parallel_size: int | None = Field(
        default=None, ge=1, description="With hosts: vLLM --tensor-parallel-size (default: every GPU of the span)."
    )
    pipeline_parallel_size: int | None = Field(
        default=None, ge=1, description="With hosts: vLLM --pipeline-parallel-size (default: 1)."
    )
    gpus_per_host: int | None = Field(
        default=None, ge=1, le=64, description="With hosts: the GPUs its rank takes on each host (default: 1)."
    )
    python: str | None = Field(
        default=None,
        description="Python of the vLLM environment this model runs with (default: vllm.python), for a model "
        "that needs another vLLM version; absolute, or relative to the models file.",
    )

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not valid_alias(alias):
                raise ValueError(f"alias {alias!r} is not a valid name ({ALIAS_RE.pattern})")
        return value

    @field_validator("path")
    @classmethod
    def _relative_path(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or ".." in Path(value).parts):
            raise ValueError("must be a path relative to models_dir without '..'")
        return value

    @model_validator(mode="after")
    def _span_adds_up(self) -> ModelOverride:
        spanning = ("tensor_parallel_size", "pipeline_parallel_size", "gpus_per_host")
        if self.hosts == 1:
            given = [k for k in spanning if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"{given[0]}: only for a model across hosts (hosts: 2 or more); on one host "
                    "placement.tensor_parallel splits a model over GPUs"
                )
            return self
        if self.replicas > 1:
            raise ValueError("replicas: a model across hosts runs as one group (replicas: 1)")
        if self.gpus is not None:
            raise ValueError("gpus: not with hosts (each host's placement chooses its rank's GPUs)")
        self.span  # noqa: B018 (raises ValueError naming the numbers)
        return self

    @property
    def span(self) -> Span | None:
        if self.hosts == 1:
            return None
        return make_span(self.hosts, self.tensor_parallel_size, self.pipeline_parallel_size, self.gpus_per_host)


class SplitOverride(BaseModel):
    """An A/B split in models.yaml: a name whose traffic goes to several models by weight,
    each client sticking to one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, float] = Field(min_length=2, description="model -> its share (any positive numbers)")
    sticky: Literal["key", "user"] = Field(
        default="key",
        description="Who stays on one model: each API key, or each end user (the request's 'user' field, "
        "else its key).",
    )

    @field_validator("models")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [m for m, w in value.items() if not w > 0]
        if bad:
            raise ValueError(f"every share must be positive: {', '.join(bad)}")
        return value


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelOverride] = Field(default_factory=dict)
    splits: dict[str, SplitOverride] = Field(default_factory=dict)
