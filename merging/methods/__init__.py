"""Merge methods, one file each, registered by name.

Adding a method: write merging/methods/<name>.py with a MergeMethod subclass decorated by
@register, and add its module name to _MODULES below. The list is explicit and imported in
full: a missing or broken method file is an ImportError, never a method that silently vanishes.
Everything the other layers know about a method (its knobs, leaderboard grid, paper, the app's
knob toggle, its diagnostics' summaries, whether the app opens with it) is read from its class.
"""

from __future__ import annotations

from merging.methods.base import (
    Diagnostics,
    MergeContext,
    MergeMethod,
    Paper,
    Param,
    TensorSet,
    Toggle,
    layer_key,
    mergekit_value,
)
from merging.registry import Registry

__all__ = ["Diagnostics", "MergeContext", "MergeMethod", "Paper", "Param", "TensorSet", "Toggle", "layer_key", "mergekit_value", "register", "get",
           "names", "all_methods", "default_method"]

_MODULES = ("linear", "task_arithmetic", "ties", "dare", "layer_swap", "ip_merging", "frank", "frism")
_registry = Registry("method", __name__, _MODULES)
register, names, get = _registry.register, _registry.names, _registry.get


def all_methods() -> list[MergeMethod]:
    """Every registered method, in names() order."""
    return [get(n) for n in names()]


def default_method() -> MergeMethod:
    """The method the app opens with: the one registered method with `default = True`."""
    marked = [m for m in all_methods() if m.default]
    if len(marked) != 1:
        raise ValueError(f"exactly one merge method must set default = True, not {len(marked)}")
    return marked[0]
