"""A registry of named plugins filled from an explicit list of modules: the merge methods
(merging.methods) and the analyses (analysis.analyses) are both one."""

from __future__ import annotations

import importlib

from merging.errors import LabError


class Registry:
    """Instances of the @register-ed classes by their `name`."""

    def __init__(self, what: str, package: str, modules: tuple[str, ...]):
        self.what, self.package, self.modules = what, package, modules
        self._items: dict = {}

    def register(self, cls):
        inst = cls()
        if not inst.name:
            raise ValueError(f"{cls.__name__} has no name")
        self._items[inst.name] = inst
        return cls

    def _load(self) -> None:
        # On first use, not at import: the listed modules import their package for register().
        # Every one is imported, so a missing or broken file is an ImportError, never a silent gap.
        for mod in self.modules:
            importlib.import_module(f"{self.package}.{mod}")

    def names(self) -> list[str]:
        """In the modules' order (a module imported early elsewhere registers early), then the
        order each module registers in."""
        self._load()
        rank = {f"{self.package}.{m}": i for i, m in enumerate(self.modules)}
        return sorted(self._items, key=lambda n: rank[type(self._items[n]).__module__])

    def get(self, name: str):
        self._load()
        if name not in self._items:
            raise LabError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[name]
