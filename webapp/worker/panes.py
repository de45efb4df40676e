"""Which model answers each side of a comparison (worker side): the chat's two panes and Evaluate's two
columns compare any two of the original VLM, this tab's merge, another merge kept by the tab, and a
DRIFT run.

A side is named by its variant: None (the original VLM), a merge recipe (a dict) or a DRIFT run
(webapp.protocol.DriftRun). Both sides must be of the triple the worker loads for the request: two
merges of one triple share the loaded VLM, and the merger keeps both merged states (its snapshots), so
going from one side to the other is a swap of the changed tensors, never a new merge.
"""

from __future__ import annotations

from pathlib import Path

from merging.errors import LabError
from webapp.protocol import DriftRun, triple_of


def request_triple(args: dict) -> tuple[str, str, str | None]:
    """The triple a chat or evaluate request runs on: its merge's (or DRIFT run's), else the one given
    (a dict {"vlm", "reasoner", "base"} from the UI, or a sequence)."""
    variant = args.get("recipe")
    if variant:
        return tuple(triple_of(variant))
    given = args["triple"]
    return tuple(triple_of(given) if isinstance(given, dict) else given)


def check_compare(args: dict) -> object:
    """The request's second side (args["compare"], None: the original VLM), refused in one line when it
    was made on another triple than the request's."""
    other = args.get("compare")
    if other and tuple(triple_of(other)) != request_triple(args):
        raise LabError("the model to compare with was made on another triple; pick the original VLM or "
                       "merge it again on this one")
    return other


def label_of(variant) -> str:
    """How a side is named in results: 'the original VLM', the method, or the DRIFT run's label."""
    if not variant:
        return "the original VLM"
    return variant.label if isinstance(variant, DriftRun) else variant["method"]


def weights_of(ctx, loaded, variant, progress=None):
    """((model, processor), weights id) holding `variant`: the loaded VLM merged (or restored) in place,
    or the DRIFT run's own model."""
    if isinstance(variant, DriftRun):
        return ctx.drift_loaded(variant.folder, progress), f"drift:{Path(variant.folder).name}"
    wid = loaded.hold(variant or None, progress=progress, cancel=ctx.flag)
    return (loaded.model, loaded.processor), wid
