"""A short supervised fine-tune of a VLM's language model, plain or with DRIFT's gradient hooks.

`python -m merging drift RECIPE OUT_DIR` reads vlm, reasoner and the `drift:` section (steps,
lr, mode, alpha, batch_size, examples, seed) of a recipe, trains on image + chain-of-thought
examples, and writes a normal Hugging Face folder atomically. alpha 0 is the plain fine-tune
with the same data and steps, so the two are comparable.
"""

from __future__ import annotations

import random
import sys
import time

import torch
from tqdm import tqdm

from merging.drift import DriftResult, attach_hooks, compute_prior, drift_settings
from merging.engine import check_device
from merging.errors import Cancelled, LabError
from merging.loading import load_model, prompt, tokenizer_of, user_turn
from merging.output_folder import AtomicFolder, guard_output
from merging.recipe import read_yaml, resolve_ref
from tasks.drift_data import training_examples


def build_batch(processor, examples: list) -> dict:
    """examples: (PIL image or None, question, answer). Loss only on the answer tokens."""
    tok = tokenizer_of(processor)
    tok.padding_side = "right"
    prompts = [prompt(processor, [user_turn(q, img is not None)]) for img, q, _ in examples]
    fulls = [p + " " + a + (tok.eos_token or "") for p, (_, _, a) in zip(prompts, examples)]
    images = [img for img, _, _ in examples if img is not None]
    kw = {"images": images} if images else {}
    enc = processor(text=fulls, return_tensors="pt", padding=True, **kw)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for i, (p, (img, _, _)) in enumerate(zip(prompts, examples)):
        n = len(processor(text=[p], **({"images": [img]} if img is not None else {}))["input_ids"][0])
        labels[i, :n] = -100
    enc["labels"] = labels
    return dict(enc)


def trainable_parameters(model) -> list:
    """The language model only: the vision tower and projector stay frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    keep = list(model.get_decoder().parameters())
    head = model.get_output_embeddings()
    if head is not None:
        keep += [p for p in head.parameters() if all(p is not q for q in keep)]
    for p in keep:
        p.requires_grad_(True)
    return keep


def finetune(model, processor, examples: list, steps: int, lr: float, batch_size: int, seed: int = 0,
             prior: dict | None = None, mode: str = "adaptive_cosine", alpha: float = 0.0,
             progress=None, cancel=None, normalize_delta: bool = True) -> list[float]:
    """Train in place; returns the loss of every step. With a prior, DRIFT hooks are attached
    (also at alpha 0, so that alpha 0 is provably the plain fine-tune) and removed at the end."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = trainable_parameters(model)
    handles = attach_hooks(model, prior, mode, alpha, normalize_delta) if prior is not None else []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    model.train()
    losses = []
    order: list[int] = []
    try:
        for step in range(steps):
            if cancel is not None and cancel():
                raise Cancelled()
            if len(order) < batch_size:
                order += rng.sample(range(len(examples)), len(examples))
            idx, order = order[:batch_size], order[batch_size:]
            batch = {k: v.to(device) for k, v in build_batch(processor, [examples[i] for i in idx]).items()}
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(step + 1, steps, f"step {step + 1}/{steps}, loss {losses[-1]:.3f}")
    finally:
        for h in handles:
            h.remove()
        model.eval()
    return losses


def load_drift_recipe(path) -> dict:
    """vlm, reasoner and the validated drift settings from a recipe file."""
    d, here = read_yaml(path)
    for k in ("vlm", "reasoner"):
        if not isinstance(d.get(k), str):
            raise LabError(f"recipe key {k!r} is missing or not a string")
    return {"vlm": resolve_ref(d["vlm"], here), "reasoner": resolve_ref(d["reasoner"], here),
            "drift": drift_settings(d.get("drift"))}


def run_drift(spec: dict, out_dir, device: str = "cpu", progress=None, cancel=None) -> DriftResult:
    """Load the VLM, train (DRIFT or plain when alpha is 0) and save to out_dir atomically."""
    s = spec["drift"]
    with AtomicFolder(out_dir) as tmp:
        prior = compute_prior(spec["vlm"], spec["reasoner"])
        # float32: the fine-tune's optimizer steps need the precision whatever the checkpoint's dtype.
        model, processor = load_model(spec["vlm"], device, dtype="float32")
        examples = training_examples(int(s["examples"]), seed=int(s["seed"]))
        t0 = time.time()
        losses = finetune(model, processor, examples, int(s["steps"]), float(s["lr"]), int(s["batch_size"]),
                          int(s["seed"]), prior, s["mode"], float(s["alpha"]), progress, cancel,
                          bool(s["normalize_delta"]))
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        seconds = time.time() - t0
        (tmp / "README.md").write_text(
            f"# DRIFT fine-tune\n\nBase VLM: `{spec['vlm']}`\nReasoner (prior): `{spec['reasoner']}`\n\n"
            f"Settings: {s}\n\nSteps: {len(losses)}, first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}, "
            f"{seconds:.1f} s\n")
    return DriftResult(folder=str(out_dir), vlm=str(spec["vlm"]), reasoner=str(spec["reasoner"]), settings=dict(s),
                       losses=tuple(losses), seconds=seconds)


def main_drift(args) -> int:
    check_device(args.device)
    spec = load_drift_recipe(args.recipe)
    guard_output(args.out_dir, (spec["vlm"], spec["reasoner"], args.recipe))  # run_drift's folder does not know the inputs
    bar = tqdm(total=spec["drift"]["steps"], desc="drift", disable=args.no_progress, file=sys.stderr)

    def progress(done, total, msg):
        bar.n = done
        bar.set_postfix_str(msg.split(", ")[-1])
        bar.refresh()

    result = run_drift(spec, args.out_dir, args.device, progress)
    bar.close()
    print(f"wrote {args.out_dir}: {result.steps} steps in {result.seconds:.1f} s, "
          f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}")
    return 0
