"""Merge methods, one file each, registered by name.

Adding a method: write merging/methods/<name>.py with a MergeMethod subclass decorated by
@register, and add its module name to _MODULES below.
"""

from __future__ import annotations

import importlib

from merging.errors import LabError
from merging.methods.base import MergeContext, MergeMethod, Param, TensorSet

__all__ = ["MergeContext", "MergeMethod", "Param", "TensorSet", "register", "get", "names"]

_REGISTRY: dict[str, MergeMethod] = {}
_MODULES = ("linear", "task_arithmetic", "ties", "dare", "layer_swap", "ip_merging", "frank")
_loaded = False


def register(cls):
    inst = cls()
    if not inst.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[inst.name] = inst
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODULES:
        try:
            importlib.import_module(f"merging.methods.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"merging.methods.{mod}":
                raise


def names() -> list[str]:
    _load_all()
    return list(_REGISTRY)


def get(name: str) -> MergeMethod:
    _load_all()
    if name not in _REGISTRY:
        raise LabError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
