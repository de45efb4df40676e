"""Layer knockout (Bring Reason to Vision): which layers does each skill depend on?

For decoder layer L and module m in {attention, mlp}, the layer's projection weights are
replaced by the constant matrix 1/out_features (attention: q,k,v,o; mlp: gate,up,down), the
model is evaluated on `perception` and `visual_math`, and the weights are restored bit for bit.
The accuracy drop against the intact model says where a skill lives: BR2V finds perception in
early layers and reasoning in middle/late ones.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from analysis.evaluate import evaluate
from merging.errors import LabError

GROUPS = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
SUITES = ("perception", "visual_math")


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


def knockout(model, processor=None, evaluate_fn=None, suites=SUITES, limit: int | None = 20, layers=None,
             groups=("attention", "mlp"), device="cpu", progress=None) -> dict:
    """Accuracy drop per (layer, group) for one loaded model.

    evaluate_fn(target, suites=..., limit=..., device=...) -> {suite: accuracy}, where target is
    (model, processor) when a processor is given, else the model; defaults to
    analysis.evaluate.evaluate (injectable so tests can score a tiny random model cheaply).
    Returns {"suites", "groups", "limit", "baseline": {suite: acc},
             "drop": {group: {suite: [per layer]}}, "accuracy": same shape, "layers": [...]}.
    """
    evaluate_fn = evaluate_fn or evaluate
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
        res = evaluate_fn(target, suites=suites, limit=limit, device=device)
        return {s: float(res[s]) for s in suites}

    baseline = run(0, "knockout: intact model")
    acc = {g: {s: [] for s in suites} for g in groups}
    done = 1
    for layer in layers:
        for g in groups:
            with knocked_out(model, layer, g):
                res = run(done, f"knockout: layer {layer} {g}")
            for s in suites:
                acc[g][s].append(res[s])
            done += 1
    if progress:
        progress(total, total, "knockout: done")
    drop = {g: {s: [baseline[s] - a for a in acc[g][s]] for s in suites} for g in groups}
    return {"suites": suites, "groups": list(groups), "limit": limit, "layers": layers,
            "baseline": baseline, "accuracy": acc, "drop": drop}
