"""The registry as it is now. A rescan replaces the registry whole; every piece of
the loader reads it through this one catalog, so none keeps an old copy."""

from __future__ import annotations

from ssw.loader.models.registry import ModelSpec, Registry


class Catalog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self.registry.models
