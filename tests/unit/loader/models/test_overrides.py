"""models.yaml's schema for a model across hosts: what does not add up is refused, naming the key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ssw.loader.models.overrides import ModelOverride
from ssw.loader.models.spans import Span


def test_one_host_is_the_default_and_has_no_span() -> None:
    assert ModelOverride().span is None
    assert ModelOverride(hosts=3, gpus_per_host=8).span == Span(3, 24, 1, 8)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tensor_parallel_size": 2}, "tensor_parallel_size: only for a model across hosts"),
        ({"gpus_per_host": 2}, "gpus_per_host: only for a model across hosts"),
        ({"hosts": 2, "replicas": 2}, "replicas: a model across hosts runs as one group"),
        ({"hosts": 2, "gpus": [0]}, "gpus: not with hosts"),
        ({"hosts": 2, "tensor_parallel_size": 3}, "tensor_parallel_size 3 does not divide the 2 GPUs"),
        ({"hosts": 0}, "hosts"),
        ({"hosts": 65}, "hosts"),
    ],
)
def test_what_does_not_add_up_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelOverride.model_validate(fields)
