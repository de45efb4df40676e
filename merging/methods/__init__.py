"""Merge methods, one file each, registered by name.

Adding a method: write merging/methods/<name>.py with a MergeMethod subclass decorated by
@register, and add its module name to _MODULES below. The list is explicit and imported in
full: a missing or broken method file is an ImportError, never a method that silently vanishes.
"""

from __future__ import annotations

from merging.methods.base import MergeContext, MergeMethod, Param, TensorSet
from merging.registry import Registry

__all__ = ["MergeContext", "MergeMethod", "Param", "TensorSet", "register", "get", "names"]

_MODULES = ("linear", "task_arithmetic", "ties", "dare", "layer_swap", "ip_merging", "frank")
_registry = Registry("method", __name__, _MODULES)
register, names, get = _registry.register, _registry.names, _registry.get
