"""The loader's admin API requests: what they accept before anything is touched."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ssw.loader.app import UnloadRequest


def test_unload_takes_a_model_or_a_worker_unit() -> None:
    assert UnloadRequest(model="light").model == "light"
    assert UnloadRequest(unit="ssw-worker@gone.service").unit == "ssw-worker@gone.service"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": "a", "unit": "ssw-worker@a.service"},
        {"unit": "ssh.service"},
        {"unit": "ssw-worker@a.service\n"},
        {"unit": "ssw-worker@../x.service"},
    ],
)
def test_unload_refuses_anything_else(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        UnloadRequest.model_validate(fields)
