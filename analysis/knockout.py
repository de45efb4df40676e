"""Layer knockout (Bring Reason to Vision): which layers does each skill depend on?

For decoder layer L and module m in {attention, mlp}, the layer's projection weights are
replaced by the constant matrix 1/out_features (attention: q,k,v,o; mlp: gate,up,down; every
entry of a weight of shape (out, in) is 1/out), the model is evaluated on `perception`,
`visual_math` and the text-only control `text_math`, and the weights are restored bit for bit.
The accuracy drop against the intact model says where a skill lives: BR2V finds perception in
early layers and reasoning in middle/late ones. The control separates "this layer reads the
image" from "this layer is needed for any answer at all": a knockout that drops text_math as much
as perception has broken the model, not its perception.

Every accuracy carries its 95% Wilson interval and every drop a paired bootstrap interval over the
same items (analysis.intervals); a drop whose interval contains 0 is marked as noise.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from analysis import intervals
from analysis.evaluate import evaluate
from merging.errors import Cancelled, LabError

GROUPS = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
SUITES = ("perception", "visual_math", "text_math")
CONTROL = "text_math"  # no image: what every knockout costs a model that need not see


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder blocks of a loaded (VLM or text) model.

    get_decoder() is the transformers way; the fallback looks for a ModuleList of blocks with
    o_proj and down_proj, which excludes vision towers (CLIP blocks have out_proj / fc1).
    """
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) and _is_lm_block(layers[0]):
        return layers
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) and _is_lm_block(mod[0])]
    if not found:
        raise LabError(f"{type(model).__name__}: no decoder layers with self_attn.o_proj and mlp.down_proj found")
    return max(found, key=lambda nm: len(nm[1]))[1]


def _is_lm_block(block) -> bool:
    try:
        block.get_submodule("self_attn.o_proj")
        block.get_submodule("mlp.down_proj")
        return True
    except AttributeError:
        return False


def _weights(block, group: str) -> list[torch.nn.Parameter]:
    out = []
    for path in GROUPS[group]:
        try:
            out.append(block.get_submodule(path).weight)
        except AttributeError:
            raise LabError(f"decoder block has no {path}; knockout covers Llama/Qwen/Mistral-style blocks") from None
    return out


@contextmanager
def knocked_out(model, layer: int, group: str):
    """Within the block, layer `layer`'s `group` projections are the constant 1/out_features.

    The originals are cloned and copied back in place on exit (also on errors), so the restored
    weights are bit-identical and any references to the parameters (optimizers, in-place
    mergers) stay valid.
    """
    params = _weights(decoder_layers(model)[layer], group)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.fill_(1.0 / p.shape[0])
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _scored(res: dict, suites: list[str]) -> tuple[dict, dict | None]:
    """({suite: accuracy}, {suite: [correct per item]} or None) of an evaluate_fn result: evaluate's
    return_items form, or a plain {suite: accuracy} (then no intervals)."""
    if "accuracy" in res and "items" in res:
        return ({s: float(res["accuracy"][s]) for s in suites},
                {s: [bool(r["correct"]) for r in res["items"][s]] for s in suites})
    return {s: float(res[s]) for s in suites}, None


def _intervals(baseline: dict, knocked: dict, layers, groups, suites) -> dict:
    """The 95% intervals: Wilson of each accuracy, paired bootstrap of each drop (intact minus knocked
    on the same items); `noise` where the drop's interval contains 0."""
    def acc_iv(correct):
        iv = intervals.accuracy(correct)
        return [iv["lo"], iv["hi"]]

    out = {"n": {s: len(baseline[s]) for s in suites}, "baseline_ci": {s: acc_iv(baseline[s]) for s in suites},
           "accuracy_ci": {}, "drop_ci": {}, "noise": {}}
    for g in groups:
        for key in ("accuracy_ci", "drop_ci", "noise"):
            out[key][g] = {s: [] for s in suites}
        for s in suites:
            for i in range(len(layers)):
                d = intervals.paired_difference(knocked[g][s][i], baseline[s])
                out["accuracy_ci"][g][s].append(acc_iv(knocked[g][s][i]))
                out["drop_ci"][g][s].append([d["lo"], d["hi"]])
                out["noise"][g][s].append(d["noise"])
    return out


def knockout(model, processor=None, evaluate_fn=None, suites=SUITES, limit: int | None = 20, layers=None,
             groups=("attention", "mlp"), device="cpu", progress=None) -> dict:
    """Accuracy drop per (layer, group) for one loaded model.

    evaluate_fn(target, suites=..., limit=..., device=...) -> evaluate's {"accuracy", "items"} (then
    every number gets its interval) or a plain {suite: accuracy}, where target is (model, processor)
    when a processor is given, else the model; defaults to analysis.evaluate.evaluate with its items
    (injectable so tests can score a tiny random model cheaply).
    Returns {"suites", "groups", "limit", "control", "baseline": {suite: acc},
             "drop": {group: {suite: [per layer]}}, "accuracy": same shape, "layers": [...]}, and with
    per-item results "n", "baseline_ci", "accuracy_ci", "drop_ci" ([lo, hi] each) and "noise".
    """
    evaluate_fn = evaluate_fn or partial(evaluate, return_items=True, stop_at_answer=True)
    n = len(decoder_layers(model))
    layers = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise LabError(f"knockout layer {bad[0]} is out of range 0..{n - 1}")
    suites = list(suites)
    target = (model, processor) if processor is not None else model
    total = 1 + len(layers) * len(groups)

    def run(done, msg):
        if progress:
            progress(done, total, msg)
        return _scored(evaluate_fn(target, suites=suites, limit=limit, device=device), suites)

    baseline, base_items = run(0, "knockout: intact model")
    acc = {g: {s: [] for s in suites} for g in groups}
    items = {g: {s: [] for s in suites} for g in groups}
    finished = []  # the layers with every group scored
    try:
        for layer in layers:
            for k, g in enumerate(groups):
                with knocked_out(model, layer, g):
                    res, per_item = run(1 + len(finished) * len(groups) + k, f"knockout: layer {layer} {g}")
                for s in suites:
                    acc[g][s].append(res[s])
                    if per_item is not None:
                        items[g][s].append(per_item[s])
            finished.append(layer)
    except Cancelled:
        if not finished:
            raise
        raise PartialKnockout(_result(suites, groups, limit, finished, baseline, base_items, acc, items)) from None
    if progress:
        progress(total, total, "knockout: done")
    return _result(suites, groups, limit, layers, baseline, base_items, acc, items)


class PartialKnockout(Cancelled):
    """A knockout cancelled after some layers: `result` holds those layers' results, marked partial
    (never cached: the caller shows it and says which layers it has)."""

    def __init__(self, result: dict):
        super().__init__(f"cancelled after {len(result['layers'])} layer(s)")
        self.result = result


def _result(suites, groups, limit, layers, baseline, base_items, acc, items) -> dict:
    """knockout()'s output for the scored `layers` (a cancelled run's lists are cut to them)."""
    n = len(layers)
    acc = {g: {s: v[:n] for s, v in by.items()} for g, by in acc.items()}
    items = {g: {s: v[:n] for s, v in by.items()} for g, by in items.items()}
    drop = {g: {s: [baseline[s] - a for a in acc[g][s]] for s in suites} for g in groups}
    out = {"suites": suites, "groups": list(groups), "limit": limit, "layers": list(layers),
           "control": CONTROL if CONTROL in suites else None, "baseline": baseline, "accuracy": acc, "drop": drop}
    if base_items is not None:
        out.update(_intervals(base_items, items, list(layers), groups, suites))
    return out
