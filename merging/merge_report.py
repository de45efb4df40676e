"""What a merge did: tensors changed, relative change per layer, the method's own diagnostics.

Both mergers (streamed to disk and in place) pass every merged tensor through `record`, which
accumulates ||W - W_v||^2 and ||W_v||^2 per canonical name in ctx.extra["changes"] (sums, so a
tensor streamed a block of rows at a time adds up to the whole). `build` turns that and the
methods' diagnostics into the report the CLI writes as merge_report.json and the app shows.
"""

from __future__ import annotations

import math
import statistics

import torch

NEAR_NOOP = 1e-4  # a largest per-layer relative change below this is "nothing visible changed"


def record(extra: dict, name: str, layer: int | None, new: torch.Tensor | None, old: torch.Tensor) -> None:
    """Accumulate the change of one merged tensor (or block of rows) against the VLM's; new None:
    the method kept the VLM's. Norms in the tensor's own dtype: no full float64 copy of a big matrix."""
    ref = float(torch.linalg.vector_norm(old.float() if not old.is_floating_point() else old)) ** 2
    diff = 0.0 if new is None or new is old else float(torch.linalg.vector_norm(new - old)) ** 2
    entry = extra.setdefault("changes", {}).setdefault(name, {"layer": layer, "diff2": 0.0, "ref2": 0.0})
    entry["diff2"] += diff
    entry["ref2"] += ref


def _layer_key(layer) -> str:
    return "other" if layer is None else str(layer)


def relative_change(changes: dict) -> dict[str, float]:
    """||W - W_v|| / ||W_v|| per decoder layer (all its tensors together); "other" for the rest."""
    sums: dict[str, list[float]] = {}
    for e in changes.values():
        s = sums.setdefault(_layer_key(e["layer"]), [0.0, 0.0])
        s[0] += e["diff2"]
        s[1] += e["ref2"]
    order = sorted(sums, key=lambda k: (k == "other", int(k) if k != "other" else 0))
    return {k: (math.sqrt(sums[k][0] / sums[k][1]) if sums[k][1] > 0 else 0.0) for k in order}


def ip_merging_diagnostics(d: dict) -> tuple[dict, list[str]]:
    scores = [s for x in d.values() for s in x["scores"].values()]
    selected = {str(k): x["selected"] for k, x in d.items()}
    thr = next(iter(d.values()))["threshold"] if d else None
    out = {"threshold": thr, "selected_per_layer": {k: len(v) for k, v in selected.items()},
           "selected": sum(len(v) for v in selected.values()), "matrices": len(scores)}
    if scores:
        q = statistics.quantiles(scores, n=4) if len(scores) > 1 else [scores[0]] * 3
        out["scores"] = {"min": min(scores), "q1": q[0], "median": q[1], "q3": q[2], "max": max(scores)}
    warn = []
    if scores and out["selected"] == 0:
        warn.append(f"ip_merging selected no matrix: highest similarity {max(scores):.2f} < threshold {thr:.2f}; "
                    "lower 'threshold' or set 'top_fraction'")
    return out, warn


def gta_diagnostics(d: dict, consensus: bool) -> dict:
    """ties / dare: the share of entries each task vector kept, and of kept entries lost to the sign vote."""
    per_layer = {}
    for k, e in d.items():
        row = {"kept_vlm": e["kept_vlm"] / max(e["entries"], 1), "kept_reasoner": e["kept_reasoner"] / max(e["entries"], 1)}
        if consensus:
            row["conflicts"] = e["conflicts"] / max(e["kept_vlm"] + e["kept_reasoner"], 1)
        per_layer[k] = row
    tot = {f: sum(e[f] for e in d.values()) for f in ("entries", "kept_vlm", "kept_reasoner", "conflicts")}
    out = {"per_layer": per_layer, "kept_vlm": tot["kept_vlm"] / max(tot["entries"], 1),
           "kept_reasoner": tot["kept_reasoner"] / max(tot["entries"], 1)}
    if consensus:
        out["conflicts"] = tot["conflicts"] / max(tot["kept_vlm"] + tot["kept_reasoner"], 1)
    return out


def method_diagnostics(extra: dict, method: str = "") -> tuple[dict, list[str]]:
    out, warn = {}, []
    if "gta" in extra:
        out["gta"] = gta_diagnostics(extra["gta"], consensus=method != "dare_linear")
    if "ip_merging" in extra:
        out["ip_merging"], w = ip_merging_diagnostics(extra["ip_merging"])
        warn += w
    if "frank" in extra:
        out["frank"] = {_layer_key(k): v for k, v in extra["frank"].items()}
    return out, warn


def build(method: str, extra: dict, in_scope: list[str]) -> dict:
    """The merge report: {"method", "changed", "in_scope", "relative_change", "diagnostics", "warnings"}."""
    changes = extra.get("changes", {})
    changed = sorted(n for n, e in changes.items() if e["diff2"] > 0)
    rel = relative_change({n: changes[n] for n in changes})
    diagnostics, warnings = method_diagnostics(extra, method)
    if not changed:
        warnings.append(f"{method} changed nothing: the merged model is the VLM")
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
    ip = report["diagnostics"].get("ip_merging")
    if ip and "scores" in ip:
        s = ip["scores"]
        lines.append(f"ip_merging merged {ip['selected']} of {ip['matrices']} matrices; similarity min {s['min']:.2f}"
                     f" / median {s['median']:.2f} / max {s['max']:.2f} vs threshold {ip['threshold']:.2f}")
    gta = report["diagnostics"].get("gta")
    if gta:
        line = (f"kept {gta['kept_vlm']:.0%} of the VLM's and {gta['kept_reasoner']:.0%} of the reasoner's "
                "task-vector entries")
        if "conflicts" in gta:
            line += f"; {gta['conflicts']:.1%} of the kept entries lost the sign vote"
        lines.append(line)
    fr = report["diagnostics"].get("frank")
    if fr:
        w = [v["w_v"] for v in fr.values()]
        lines.append(f"frank w_v from {w[0]:.2f} (first layer) to {w[-1]:.2f} (last)")
    return lines + [f"warning: {w}" for w in report["warnings"]]
