"""A/B splits in models.yaml: checked when the registry is read, each error naming
its key; a member absent from this host leaves the split to the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ssw.errors import ConfigError
from ssw.loader.models.registry import scan
from tests.conftest import QWEN2_CONFIG, make_model_dir

MODELS = {"a": {"aliases": ["light"]}, "b": {}, "gone": {"path": "nowhere"}}


def registry(tmp_path: Path, splits: dict[str, Any]) -> Any:
    for name in ("a", "b"):
        make_model_dir(tmp_path / "m" / name, QWEN2_CONFIG)
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": MODELS, "splits": splits}))
    return scan(tmp_path / "m", tmp_path / "models.yaml")


def test_a_split_names_its_models_by_share_and_an_alias_counts_as_its_model(tmp_path: Path) -> None:
    reg = registry(tmp_path, {"dialogue": {"models": {"light": 3, "b": 1}, "sticky": "user"}})
    assert reg.splits == {"dialogue": ({"a": 3.0, "b": 1.0}, "user")}
    assert reg.name_taken("dialogue") is not None  # no model directory may take its name


def test_a_member_absent_from_this_host_gives_its_share_to_the_others(tmp_path: Path) -> None:
    reg = registry(tmp_path, {"dialogue": {"models": {"a": 1, "gone": 1}}, "ghost": {"models": {"gone": 1, "b": 1}}})
    assert reg.splits["dialogue"] == ({"a": 1.0}, "key") and reg.splits["ghost"] == ({"b": 1.0}, "key")


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"a": {"models": {"a": 1, "b": 1}}}, "splits.a: 'a' is already a model's name or an alias"),
        ({"light": {"models": {"a": 1, "b": 1}}}, "splits.light: 'light' is already a model's name or an alias"),
        ({"d": {"models": {"a": 1, "nope": 1}}}, "splits.d.models: 'nope' is no model or alias of models.yaml"),
        ({"d": {"models": {"a": 1, "b": 0}}}, "every share must be positive: b"),
        ({"d": {"models": {"a": 1}}}, "splits.d.models"),  # at least two
        ({"d": {"models": {"a": 1, "b": 1}, "sticky": "session"}}, "splits.d.sticky"),
        ({"../x": {"models": {"a": 1, "b": 1}}}, "not a valid name"),
    ],
)
def test_a_bad_split_names_its_key(tmp_path: Path, splits: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        registry(tmp_path, splits)
    assert message in raised.value.message
