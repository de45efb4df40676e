"""Can this triple be merged? A report for people, and one clear reason when it cannot.

`python -m merging check RECIPE` prints the report and writes nothing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from merging import params
from merging import recipe as recipe_mod
from merging.checkpoint import Checkpoint
from merging.errors import LabError
from merging.layout import VOCAB_TENSORS, Layout, derive_layout

# A fine-tune moves a weight matrix by a few percent of its norm; a relative task vector this
# large means the base is probably not the model's parent (merges from it degrade).
PARENT_RATIO = 0.5


@dataclass
class CompatReport:
    refs: dict[str, str]
    layouts: dict[str, Layout]
    fingerprints: dict[str, str]
    shape_mismatches: list[str] = field(default_factory=list)  # "name: vlm (a,b) vs reasoner (c,d)"
    missing: list[str] = field(default_factory=list)  # "name missing in reasoner"
    warnings: list[str] = field(default_factory=list)
    reason: str | None = None  # why the triple cannot be merged (the first problem); None when it can
    problems: list[str] = field(default_factory=list)  # every reason it cannot, so all are fixed at once
    # "reasoner vs vlm", "vlm vs base", ...: max relative distance ||W_a - W_b|| / ||W_b|| over the probes
    distances: dict[str, float] = field(default_factory=dict)

    def fail(self, problem: str) -> None:
        self.problems.append(problem)
        self.reason = self.reason or problem

    @property
    def ok(self) -> bool:
        return self.reason is None

    def raise_if_incompatible(self) -> None:
        if self.reason:
            raise LabError(self.reason)

    def lines(self) -> list[str]:
        out = []
        for role, lay in self.layouts.items():
            out.append(f"{role:9s} {self.refs[role]}")
            out.append(f"          family {lay.family}, {lay.num_layers} layers, hidden {lay.hidden_size}, "
                       f"vocab {lay.vocab_size}, {len(lay.lm)} LM tensors, {len(lay.other)} untouched "
                       f"(vision/projector), fingerprint {self.fingerprints[role]}")
        out += [f"shape differs: {m}" for m in self.shape_mismatches]
        out += [f"missing: {m}" for m in self.missing]
        if self.distances:
            out.append("distance  " + ", ".join(f"{k} {v:.3f}" for k, v in self.distances.items())
                       + "  (||W_a - W_b|| / ||W_b||, two probe matrices)")
        out += [f"warning: {w}" for w in self.warnings]
        out.append("compatible: yes" if self.ok else f"compatible: NO - {self.reason}")
        return out


def check_triple(vlm: str, reasoner: str, base: str | None = None, allow_bin: bool = False) -> CompatReport:
    refs = {"vlm": vlm, "reasoner": reasoner}
    if base:
        refs["base"] = base
    layouts, prints, shapes, unreadable = {}, {}, {}, []
    for role, ref in refs.items():
        try:
            with Checkpoint.open(ref, allow_bin=allow_bin) as ck:
                layouts[role] = derive_layout(ck)
                whole = [a for a in layouts[role].lm.values() if not ck.dtype(a).is_floating_point]
                if whole:  # a merge would average integers or booleans into garbage
                    raise LabError(f"language-model tensor {whole[0]} is {str(ck.dtype(whole[0]))[6:]}, "
                                   "not floating point; the lab merges only float weights")
                prints[role] = ck.fingerprint
                shapes[role] = {c: ck.shape(a) for c, a in layouts[role].lm.items()}
        except LabError as e:
            unreadable.append(f"{role}: {e}")  # every model's problem in one message, not one per try
    if unreadable:
        raise LabError("; ".join(unreadable))
    rep = CompatReport(refs, layouts, prints)
    for role, lay in layouts.items():
        rep.warnings += [f"{role}: {w}" for w in lay.warnings]
    v = layouts["vlm"]
    if not v.is_vlm:
        rep.warnings.append("vlm: this model has no vision part; merging a text LLM works the same way")
    for role in refs:
        if role == "vlm":
            continue
        o = layouts[role]
        if o.num_layers != v.num_layers:
            rep.fail(f"layer counts differ: vlm has {v.num_layers}, {role} has {o.num_layers}")
        if v.hidden_size and o.hidden_size and v.hidden_size != o.hidden_size:
            rep.fail(f"hidden sizes differ: vlm {v.hidden_size}, {role} {o.hidden_size}")
        shape_failed = False
        for name, shape in shapes["vlm"].items():
            if name not in shapes[role]:
                if name in VOCAB_TENSORS:
                    rep.warnings.append(f"{name} absent in {role} (tied embeddings?); the VLM's is kept")
                    continue
                rep.missing.append(f"{name} missing in {role}")
                continue
            if shapes[role][name] != shape:
                msg = f"{name}: vlm {tuple(shape)} vs {role} {tuple(shapes[role][name])}"
                rep.shape_mismatches.append(msg)
                if name not in VOCAB_TENSORS and not shape_failed:  # the first per model is enough to fix
                    shape_failed = True
                    rep.fail(f"tensor shapes differ: {msg}")
        extra = [n for n in shapes[role] if n not in shapes["vlm"]]
        if extra:
            rep.warnings.append(f"{role} has {len(extra)} LM tensors the vlm lacks (ignored), e.g. {extra[0]}")
    if rep.missing:
        rep.fail(f"tensor {rep.missing[0]}" + (f" (and {len(rep.missing) - 1} more)" if len(rep.missing) > 1 else ""))
    if rep.ok:
        rep.warnings += _distance_probe(rep, allow_bin)
    if v.vocab_size and any(layouts[r].vocab_size != v.vocab_size for r in refs):
        sizes = ", ".join(f"{r} {layouts[r].vocab_size}" for r in refs)
        rep.warnings.append(f"vocab sizes differ ({sizes}): embeddings and lm_head keep the VLM's unless "
                            "embeddings: merge_shared_rows")
    return rep


def _distance_probe(rep: CompatReport, allow_bin: bool) -> list[str]:
    """Relative distances ||W_a - W_b|| / ||W_b|| on two projections (first and middle layer), a few
    tensors read: the reasoner against the VLM always (a reasoner from another base is far from the
    VLM whether or not a base is given), and each model against the base when there is one."""
    refs, layouts = rep.refs, rep.layouts
    n = layouts["vlm"].num_layers
    probes = [c for c in ("layers.0.mlp.up_proj.weight", f"layers.{n // 2}.self_attn.q_proj.weight")
              if all(c in layouts[r].lm for r in refs)]
    if not probes:
        return []
    w = {}
    for role in refs:
        with Checkpoint.open(refs[role], allow_bin=allow_bin) as ck:
            w[role] = {c: ck.get(layouts[role].lm[c]).float() for c in probes}

    def dist(a: str, b: str) -> float:
        return max(float((w[a][c] - w[b][c]).norm() / (w[b][c].norm() + 1e-12)) for c in probes)

    out = []
    rep.distances["reasoner vs vlm"] = d = dist("reasoner", "vlm")
    if d > PARENT_RATIO:
        out.append(f"the reasoner is far from the VLM's language model (||W_r - W_vlm|| / ||W_vlm|| = {d:.2f}, "
                   f"a fine-tune of a shared base is a few hundredths): they probably do not share a base, "
                   "and a merge of the two gives a broken model")
    if "base" in refs:
        for role in ("vlm", "reasoner"):
            rep.distances[f"{role} vs base"] = ratio = dist(role, "base")
            if ratio > PARENT_RATIO:
                out.append(f"the {role}'s task vector is implausibly large (||W - W_base|| / ||W_base|| = "
                           f"{ratio:.2f}); is {refs['base']} really the {role}'s parent?")
    return out


def check_recipe(recipe) -> CompatReport:
    return check_triple(recipe.vlm, recipe.reasoner, recipe.base)


def main_check(args) -> int:
    rec = recipe_mod.load(args.recipe)
    rep = check_recipe(rec)
    print(f"method: {rec.method}  parameters: {rec.knobs()}")
    print("\n".join(rep.lines()))
    if not rep.ok:
        print(f"error: cannot merge: {rep.reason}", file=sys.stderr)
        return 2
    params.validate_lengths(rec, rep.layouts["vlm"].num_layers)
    return 0
