"""Models bigger than one host (pure): how a model that says ``hosts: N`` in
models.yaml is cut, and whether vLLM would accept the cut for its shape.

vLLM's multi-node backend runs ``tensor_parallel_size × pipeline_parallel_size``
ranks (its world), the same number on every node: ``gpus_per_host`` each. The
arithmetic is checked when models.yaml is read (the error names the key); the
shape (attention heads, key-value heads, layers), once the model's config.json
is read, with vLLM's own rules, so that a cut vLLM would refuse after a minute
of loading on several hosts is refused at once, naming the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HOSTS = 64
TP = "tensor_parallel_size"


@dataclass(frozen=True)
class Span:
    """One model over ``hosts`` hosts: its world of ``tensor_parallel × pipeline_parallel``
    ranks, ``gpus_per_host`` of them on each host."""

    hosts: int
    tensor_parallel: int
    pipeline_parallel: int
    gpus_per_host: int

    @property
    def world(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def describe(self) -> str:
        return (
            f"{self.hosts} hosts × {self.gpus_per_host} GPU (tensor parallel {self.tensor_parallel}, "
            f"pipeline parallel {self.pipeline_parallel})"
        )


def make_span(
    hosts: int, tensor_parallel: int | None, pipeline_parallel: int | None, gpus_per_host: int | None
) -> Span:
    """The span models.yaml describes, with what it leaves out worked out; ValueError naming
    the key and the numbers when they do not add up. Defaults: one GPU per host, and
    the whole world tensor parallel."""
    if hosts < 2:
        raise ValueError("hosts: a model spans 2 hosts or more (1 is the default: one host)")
    if gpus_per_host is None:
        if tensor_parallel is not None and pipeline_parallel is not None:
            world = tensor_parallel * pipeline_parallel
            if world % hosts:
                raise ValueError(
                    f"tensor_parallel_size × pipeline_parallel_size = {world} ranks cannot be spread evenly over "
                    f"{hosts} hosts (vLLM runs as many on each)"
                )
            gpus_per_host = world // hosts
        else:
            gpus_per_host = 1
    world = hosts * gpus_per_host
    if tensor_parallel is None and pipeline_parallel is None:
        tensor_parallel, pipeline_parallel = world, 1
    elif tensor_parallel is None:
        assert pipeline_parallel is not None
        if world % pipeline_parallel:
            raise ValueError(
                f"pipeline_parallel_size {pipeline_parallel} does not divide the {world} GPUs of "
                f"{hosts} hosts × {gpus_per_host} (gpus_per_host)"
            )
        tensor_parallel = world // pipeline_parallel
    elif pipeline_parallel is None:
        if world % tensor_parallel:
            raise ValueError(
                f"tensor_parallel_size {tensor_parallel} does not divide the {world} GPUs of "
                f"{hosts} hosts × {gpus_per_host} (gpus_per_host)"
            )
        pipeline_parallel = world // tensor_parallel
    if tensor_parallel * pipeline_parallel != world:
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel} × pipeline_parallel_size {pipeline_parallel} = "
            f"{tensor_parallel * pipeline_parallel} ranks, but {hosts} hosts × {gpus_per_host} (gpus_per_host) "
            f"= {world} GPUs"
        )
    return Span(hosts, tensor_parallel, pipeline_parallel, gpus_per_host)


def shape_problem(span: Span, heads: int | None, kv_heads: int | None, layers: int | None) -> tuple[str, str] | None:
    """(the models.yaml key, why) vLLM would refuse this cut of a model with this shape
    (None: it would not, or config.json does not say enough to tell): attention heads and
    key-value heads split across tensor-parallel ranks, layers across pipeline stages."""
    tp, pp = span.tensor_parallel, span.pipeline_parallel
    if heads is not None and heads % tp:
        return TP, f"its {heads} attention heads cannot be split over tensor_parallel_size {tp} (vLLM needs a divisor)"
    if kv_heads is not None and kv_heads >= tp and kv_heads % tp:
        return TP, f"its {kv_heads} key-value heads cannot be split over tensor_parallel_size {tp}"
    if kv_heads is not None and kv_heads < tp and tp % kv_heads:
        return (
            TP,
            f"tensor_parallel_size {tp} is not a multiple of its {kv_heads} key-value heads "
            "(vLLM replicates them only by a whole factor)",
        )
    if layers is not None and layers < pp:
        return "pipeline_parallel_size", f"its {layers} layers cannot fill pipeline_parallel_size {pp} stages"
    return None
