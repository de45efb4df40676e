"""How the UI names a model it compares: a merge recipe ('task_arithmetic alpha 0.5, layers 2-7'), a DRIFT run
(its own label) or the original VLM (UI side)."""

from __future__ import annotations

from merging.recipe import knobs_text
from webapp.protocol import DriftRun

VLM = "the original VLM"


def variant_label(variant) -> str | None:
    """Short form of what answers on the left: 'task_arithmetic alpha 0.5, layers 2-7', 'DRIFT run ...'."""
    if not variant:
        return None
    if isinstance(variant, DriftRun):
        return variant.label
    knobs = knobs_text(variant.get("parameters"))
    layers = variant.get("layers")
    where = f", layers {layers[0]}-{layers[1]}" if layers else ""
    return f"{variant['method']}{' ' + knobs if knobs else ''}{where}"


def name_of(variant) -> str:
    """A side's full name: 'merge: ...', 'DRIFT run: ...', or the VLM."""
    if not variant:
        return VLM
    return f"{'DRIFT run' if isinstance(variant, DriftRun) else 'merge'}: {variant_label(variant)}"


def right_title(other) -> str:
    """The chat's right pane title for what answers there."""
    return "Original VLM" if not other else f"Compared with ({name_of(other)})"
