"""How a model across hosts is cut, and what vLLM would refuse for its shape, by table."""

from __future__ import annotations

import pytest

from ssw.loader.models.spans import Span, make_span, shape_problem


@pytest.mark.parametrize(
    ("hosts", "tp", "pp", "per_host", "expected"),
    [
        (2, None, None, None, Span(2, 2, 1, 1)),  # one GPU per host, all tensor parallel
        (3, None, None, 8, Span(3, 24, 1, 8)),  # three 8-GPU hosts
        (2, None, 2, None, Span(2, 1, 2, 1)),  # a stage per host
        (2, 8, 2, None, Span(2, 8, 2, 8)),  # the GPUs per host follow from tp × pp
        (4, 8, None, 2, Span(4, 8, 1, 2)),
        (2, 2, None, 4, Span(2, 2, 4, 4)),  # pipeline parallel takes what tensor parallel leaves
    ],
)
def test_a_span_works_out_what_models_yaml_leaves_out(
    hosts: int, tp: int | None, pp: int | None, per_host: int | None, expected: Span
) -> None:
    span = make_span(hosts, tp, pp, per_host)
    assert span == expected
    assert span.world == span.hosts * span.gpus_per_host


@pytest.mark.parametrize(
    ("hosts", "tp", "pp", "per_host", "message"),
    [
        (1, None, None, None, "hosts: a model spans 2 hosts or more"),
        (3, 2, 2, None, "= 4 ranks cannot be spread evenly over 3 hosts"),
        (2, 3, None, None, "tensor_parallel_size 3 does not divide the 2 GPUs of 2 hosts × 1"),
        (2, None, 3, 2, "pipeline_parallel_size 3 does not divide the 4 GPUs of 2 hosts × 2"),
        (2, 2, 2, 1, "tensor_parallel_size 2 × pipeline_parallel_size 2 = 4 ranks, but 2 hosts × 1"),
    ],
)
def test_arithmetic_that_does_not_add_up_names_the_numbers(
    hosts: int, tp: int | None, pp: int | None, per_host: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_span(hosts, tp, pp, per_host)


@pytest.mark.parametrize(
    ("span", "heads", "kv_heads", "layers", "problem"),
    [
        (Span(2, 2, 1, 1), 2, 2, 2, None),  # the tests' tiny model, tensor parallel 2
        (Span(2, 1, 2, 1), 2, 2, 2, None),  # ...and pipeline parallel 2
        (
            Span(2, 4, 1, 2),
            2,
            2,
            2,
            (
                "tensor_parallel_size",
                "its 2 attention heads cannot be split over tensor_parallel_size 4 (vLLM needs a divisor)",
            ),
        ),
        (Span(2, 16, 1, 8), 128, 8, 61, None),  # DeepSeek-V3 class over two 8-GPU hosts: KV heads replicated
        (
            Span(2, 8, 1, 4),
            64,
            12,
            40,
            ("tensor_parallel_size", "its 12 key-value heads cannot be split over tensor_parallel_size 8"),
        ),
        (
            Span(2, 8, 1, 4),
            64,
            3,
            40,
            (
                "tensor_parallel_size",
                "tensor_parallel_size 8 is not a multiple of its 3 key-value heads "
                "(vLLM replicates them only by a whole factor)",
            ),
        ),
        (
            Span(4, 1, 4, 1),
            2,
            2,
            2,
            ("pipeline_parallel_size", "its 2 layers cannot fill pipeline_parallel_size 4 stages"),
        ),
        (Span(2, 2, 1, 1), None, None, None, None),  # config.json says too little: vLLM decides
    ],
)
def test_shape_problems_are_vllms_own(
    span: Span, heads: int | None, kv_heads: int | None, layers: int | None, problem: tuple[str, str] | None
) -> None:
    assert shape_problem(span, heads, kv_heads, layers) == problem
