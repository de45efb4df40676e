"""What a merge did: tensors changed, relative change per layer, the method's own diagnostics.

Both mergers (streamed to disk and in place) pass every merged tensor through `record`, which
accumulates ||W - W_v||^2 and ||W_v||^2 per canonical name in ctx.diagnostics.changes (sums, so a
tensor streamed a block of rows at a time adds up to the whole). `build` turns that and the
methods' diagnostics into the report the CLI writes as merge_report.json and the app shows.
"""

from __future__ import annotations

import math

import torch

from merging import methods
from merging.methods import Diagnostics, layer_key

NEAR_NOOP = 1e-4  # a largest per-layer relative change below this is "nothing visible changed"


def record(diag: Diagnostics, name: str, layer: int | None, new: torch.Tensor | None, old: torch.Tensor) -> None:
    """Accumulate the change of one merged tensor (or block of rows) against the VLM's; new None:
    the method kept the VLM's."""
    diag.add_change(name, layer, *change(new, old))


def change(new: torch.Tensor | None, old: torch.Tensor, ref2: float | None = None) -> tuple[float, float]:
    """(||new - old||^2, ||old||^2) of one tensor or block of rows, what record() adds up; ref2: the
    second, when already known (the VLM's norms do not change between merges). Norms in the
    tensor's own dtype: no full float64 copy of a big matrix."""
    if ref2 is None:
        ref2 = float(torch.linalg.vector_norm(old.float() if not old.is_floating_point() else old)) ** 2
    diff = 0.0 if new is None or new is old else float(torch.linalg.vector_norm(new - old)) ** 2
    return diff, ref2


def relative_change(changes: dict) -> dict[str, float]:
    """||W - W_v|| / ||W_v|| per decoder layer (all its tensors together); "other" for the rest."""
    sums: dict[str, list[float]] = {}
    for e in changes.values():
        s = sums.setdefault(layer_key(e["layer"]), [0.0, 0.0])
        s[0] += e["diff2"]
        s[1] += e["ref2"]
    order = sorted(sums, key=lambda k: (k == "other", int(k) if k != "other" else 0))
    return {k: (math.sqrt(sums[k][0] / sums[k][1]) if sums[k][1] > 0 else 0.0) for k in order}


def method_diagnostics(diag: Diagnostics, method: str) -> tuple[dict, list[str]]:
    """The method's own diagnostics and warnings (MergeMethod.summarize_diagnostics)."""
    return methods.get(method).summarize_diagnostics(diag.as_dict())


def _method_of(report: dict):
    """The method a report is of, or None for a name no longer registered (an old report file)."""
    name = report.get("method")
    return methods.get(name) if name in methods.names() else None


def diagnostic_grid(report: dict) -> dict | None:
    """The merge method's per-layer grid of the report's diagnostics (MergeMethod.diagnostic_grid), or None."""
    m = _method_of(report)
    return m.diagnostic_grid(report.get("diagnostics", {})) if m else None


def layer_note(report: dict, layer: str) -> str:
    """The method's own note on one layer (the report figure's hover text), or ''."""
    m = _method_of(report)
    return m.layer_note(report.get("diagnostics", {}), layer) if m else ""


def _zero_knobs(method: str, knobs: dict | None) -> list[str]:
    """The method's number knobs set to 0 (everywhere, for a per-layer list): what a no-op merge names."""
    floats = {p.name for p in methods.get(method).params if p.kind is float} if method in methods.names() else set()
    return [k for k, v in (knobs or {}).items() if k in floats
            and all(x == 0 for x in (v if isinstance(v, list) else [v]) if isinstance(x, (int, float)))]


def build(method: str, diag: Diagnostics, in_scope: list[str], knobs: dict | None = None) -> dict:
    """The merge report: {"method", "changed", "in_scope", "relative_change", "diagnostics", "warnings"}.
    knobs: the merge's knob values, so a merge that changed nothing names the knob at 0."""
    changes = diag.changes
    changed = sorted(n for n, e in changes.items() if e["diff2"] > 0)
    rel = relative_change({n: changes[n] for n in changes})
    diagnostics, warnings = method_diagnostics(diag, method)
    if not changed:
        zeros = _zero_knobs(method, knobs)
        why = (f"{' and '.join(zeros)} {'is' if len(zeros) == 1 else 'are'} 0: raise it to add the reasoner"
               if zeros else "check its knobs and the layer range")
        warnings.append(f"{method} changed nothing: the merged model is the VLM ({why})")
    elif max(rel.values(), default=0.0) < NEAR_NOOP:
        warnings.append(f"{method} barely changed the model (largest relative change per layer "
                        f"{max(rel.values()):.1e}); move its knobs further")
    return {"method": method, "changed": changed, "in_scope": len(in_scope), "relative_change": rel,
            "diagnostics": diagnostics, "warnings": warnings}


def summary_lines(report: dict) -> list[str]:
    """Short human lines (CLI stdout, the app's status), warnings last, each prefixed 'warning:'."""
    rel = report["relative_change"]
    lines = [f"changed {len(report['changed'])} of {report['in_scope']} tensors in scope; "
             f"relative norm change ||W - W_v|| / ||W_v|| per layer up to {max(rel.values(), default=0.0):.2%}"]
    m = _method_of(report)
    if m is not None:
        lines += m.report_lines(report["diagnostics"])
    return lines + [f"warning: {w}" for w in report["warnings"]]
