"""A/B splits in models.yaml, checked against the registry: a split's name is nobody
else's, and its members are models (an alias names its model)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ssw.common.contract import NAME_RE, valid_name
from ssw.errors import ConfigError

if TYPE_CHECKING:
    from ssw.loader.models.overrides import ModelOverride, SplitOverride
    from ssw.loader.models.registry import ModelSpec


def check_splits(
    configured: dict[str, SplitOverride],
    models: dict[str, ModelSpec],
    aliases: dict[str, str],
    overrides: dict[str, ModelOverride],
    models_file: Path,
) -> dict[str, tuple[dict[str, float], str]]:
    """The A/B splits, checked: a split's name is nobody else's, its members are models
    (an alias names its model). A member whose files are absent here leaves the split; its
    share goes to the others."""
    out: dict[str, tuple[dict[str, float], str]] = {}
    taken = set(overrides) | set(models) | {a for ov in overrides.values() for a in ov.aliases}
    for name, split in configured.items():
        where = f"{models_file}: splits.{name}"
        if not valid_name(name):
            raise ConfigError(f"{where}: not a valid name ({NAME_RE.pattern})")
        if name in taken:
            raise ConfigError(f"{where}: {name!r} is already a model's name or an alias")
        shares: dict[str, float] = {}
        for member, share in split.models.items():
            model = aliases.get(member, member)
            if member not in overrides and member not in models and member not in aliases:
                raise ConfigError(f"{where}.models: {member!r} is no model or alias of models.yaml")
            if model in models:
                shares[model] = shares.get(model, 0.0) + share
        if shares:
            out[name] = (shares, split.sticky)
    return out
