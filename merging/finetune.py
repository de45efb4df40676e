"""A short supervised fine-tune of a VLM's language model, plain or with DRIFT's gradient hooks.

`python -m merging drift RECIPE OUT_DIR` reads vlm, reasoner and the `drift:` section (data, steps,
lr, mode, alpha, batch_size, examples, seed) of a recipe, trains on image + question + answer
examples, and writes a normal Hugging Face folder atomically. alpha 0 is the plain fine-tune
with the same data and steps, so the two are comparable.

The data is `data:`, a JSONL in the eval upload's format (merging.item_file), its path relative to
the recipe's folder; `examples` caps how many of its items are used (the first ones). Without it only
the bundled toy family trains, on its toy scenes (tasks.drift_data): they mean nothing to another VLM,
so any other is refused. Prompts and targets both go through the family's chat template, and only
the target's tokens (the answer and the template's end of turn) carry the loss.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from merging import drift_memory
from merging.device import check_device
from merging.drift import DriftResult, attach_hooks, compute_prior, drift_settings
from merging.errors import Cancelled, LabError
from merging.hub import resolve
from merging.item_file import check_items, data_digest, open_images
from merging.loading import load_model, prompt, tokenizer_of, user_turn
from merging.output_folder import AtomicFolder, guard_output
from merging.recipe import read_yaml, resolve_ref
from tasks.drift_data import training_examples

# The stamp tools/make_toy_family.py writes into each folder of the bundled family (tools may not be
# imported here); {"stage": "vlm"} marks its VLM, the one model the toy scenes were made for.
TOY_STAMP = "toy_stage.json"


@dataclass(frozen=True)
class TrainingData:
    """What a fine-tune trains on, checked whole. examples: (image or None, question, answer), the
    image a PIL image (toy scenes) or the Path of a checked file, opened a batch at a time so that a
    large set is never all in memory."""

    examples: list
    digest: str  # sha256 of the JSONL and of every image it names; "toy" for the toy scenes
    source: str  # what it is, for messages and the output's README


def is_toy_family(vlm_ref) -> bool:
    """Whether the VLM is the bundled toy family's (its stamp says so)."""
    try:
        return json.loads((resolve(vlm_ref) / TOY_STAMP).read_text()).get("stage") == "vlm"
    except (LabError, OSError, ValueError, AttributeError):
        return False


def file_data(path, limit: int, by_name: bool = False, name: str | None = None) -> TrainingData:
    """The first `limit` items of a JSONL, every line checked (merging.item_file) and each used image
    decoded once, so that a broken one is named now rather than in the middle of the run."""
    name = name or str(path)
    items = check_items(path, by_name, name)
    used = items[:limit]
    for it in used:
        open_images([it], name)
        it.pop("pil", None)  # only the check: pixels are read again a batch at a time
    examples = [(it["image_path"], it["question"], it["answer"]) for it in used]
    return TrainingData(examples, data_digest(Path(path), items), f"{len(used)} of the {len(items)} items of {name}")


def training_data(spec: dict) -> TrainingData:
    """A run's examples: the `data` file of its settings; without one the toy scenes, for the
    bundled family only. spec may carry data_by_name and data_name (an upload of the app)."""
    s = spec["drift"]
    n = int(s["examples"])
    if s.get("data") is not None:
        return file_data(s["data"], n, bool(spec.get("data_by_name")), spec.get("data_name"))
    if not is_toy_family(spec["vlm"]):
        raise LabError(f"DRIFT on {spec['vlm']} needs training data: give a JSONL of image + question + answer "
                       "(the recipe's drift: data: train.jsonl, or the DRIFT panel's upload); the built-in toy "
                       "scenes are only for the bundled toy family")
    replay = float(s.get("replay") or 0.0)
    shown = f"{n} toy scenes" + (f", {replay:.0%} of them perception questions" if replay else "")
    return TrainingData(training_examples(n, seed=int(s["seed"]), replay=replay), "toy", shown)


def run_identity(spec: dict, data: TrainingData) -> dict:
    """What names a run (the app reuses the folder of an earlier identical one): the models and the
    settings, with the data's content hash in place of its path."""
    return {"vlm": str(spec["vlm"]), "reasoner": str(spec["reasoner"]), "drift": {**spec["drift"], "data": data.digest}}


# ------------------------------------------------------------------------------------- batches
def _rgb(image):
    """A toy scene as it is; a data file's image opened (as RGB) when its batch is built."""
    if image is None or isinstance(image, Image.Image):
        return image
    with Image.open(image) as im:
        return im.convert("RGB")


def _rendered(proc, question: str, has_image: bool, answer: str) -> str | None:
    """The question and its answer as the chat template writes them (prompt()'s template); None
    without a template, or when it takes the assistant's text neither as parts nor as a string."""
    obj = next((o for o in (proc, tokenizer_of(proc)) if getattr(o, "chat_template", None)), None)
    for content in ([{"type": "text", "text": answer}], answer) if obj is not None else ():
        try:
            return obj.apply_chat_template([user_turn(question, has_image), {"role": "assistant", "content": content}],
                                           tokenize=False, add_generation_prompt=False)
        except Exception:  # jinja's TemplateError, or a template's own raise_exception: try the other form
            continue
    return None


def target_text(proc, question: str, has_image: bool, answer: str, prompt_text: str) -> str:
    """What training puts after the generation prompt: the answer as the template writes the assistant's
    turn, with the separator before it and the end of turn after it (else the eos token). A template
    whose generation prompt holds more than its written turns (a think tag) still gets the answer and
    the turn's end. Without a template, " answer" + eos."""
    eos = tokenizer_of(proc).eos_token or ""
    full = _rendered(proc, question, has_image, answer)
    at = -1 if full is None else full.rfind(answer)
    if at < 0:
        return " " + answer + eos
    head, after = full[:at], full[at + len(answer):]
    if head.startswith(prompt_text):
        sep = head[len(prompt_text):]
    else:  # the turn's own whitespace before the answer, unless the prompt already ends in some
        sep = "" if prompt_text[-1:].isspace() else head[len(head.rstrip()):]
    return sep + answer + (after if after.strip() else eos)


def build_batch(processor, examples: list) -> dict:
    """examples: (image or None, question, answer). The prompts go through the processor (image tokens
    expanded), each target through the tokenizer alone, joined as ids: the labels are exactly the
    target's tokens (nothing a BPE merges across the boundary), every prompt token is -100."""
    tok = tokenizer_of(processor)
    images = [_rgb(img) for img, _, _ in examples]
    prompts = [prompt(processor, [user_turn(q, img is not None)]) for img, q, _ in examples]
    # Images per sample ([] for a text-only one): Gemma3's and Idefics' processors count them per
    # prompt, and the others flatten the nesting.
    kw = {"images": [[im] if im is not None else [] for im in images]} if any(im is not None for im in images) else {}
    # add_special_tokens=False: the template writes them, as for generation (analysis.evaluate, webapp.worker.chat)
    enc = processor(text=prompts, return_tensors="pt", padding=True, add_special_tokens=False, **kw)
    ids, real = enc["input_ids"], enc["attention_mask"].bool()
    heads = [ids[i][real[i]].tolist() for i in range(len(examples))]  # either padding side
    tails = [tok(target_text(processor, q, img is not None, a, p), add_special_tokens=False)["input_ids"]
             for p, (img, q, a) in zip(prompts, examples)]
    width = max(len(h) + len(t) for h, t in zip(heads, tails))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = {"input_ids": torch.full((len(heads), width), pad, dtype=torch.long)}
    out["attention_mask"] = torch.zeros_like(out["input_ids"])
    out["labels"] = torch.full_like(out["input_ids"], -100)
    for i, (h, t) in enumerate(zip(heads, tails)):
        out["input_ids"][i, :len(h) + len(t)] = torch.tensor(h + t, dtype=torch.long)
        out["attention_mask"][i, :len(h) + len(t)] = 1
        out["labels"][i, len(h):len(h) + len(t)] = torch.tensor(t, dtype=torch.long)
    for k, v in enc.items():
        if k in out:
            continue
        if k.endswith("token_type_ids"):  # per token: the prompt's, then 0 (text) over the target
            ext = torch.zeros((len(heads), width), dtype=v.dtype)
            for i in range(len(heads)):
                ext[i, :len(heads[i])] = v[i][real[i]]
            v = ext
        out[k] = v
    return out


def trainable_parameters(model, layers: list[int] | None = None) -> list:
    """The language model only: the vision tower and projector stay frozen; with LAYERS [a, b], only the
    decoder layers a..b train (the embeddings, the final norm and the head stay frozen too)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if layers is None:
        keep = list(model.get_decoder().parameters())
        head = model.get_output_embeddings()
        if head is not None:
            keep += [p for p in head.parameters() if all(p is not q for q in keep)]
    else:
        blocks = getattr(model.get_decoder(), "layers", None)
        if blocks is None:
            raise LabError("drift layers: this model's decoder has no list of layers; train it whole (no 'layers')")
        if layers[1] >= len(blocks):
            raise LabError(f"drift layers {layers} is out of range: the model has {len(blocks)} decoder layers "
                           f"(0 to {len(blocks) - 1})")
        keep = [p for i in range(layers[0], layers[1] + 1) for p in blocks[i].parameters()]
    for p in keep:
        p.requires_grad_(True)
    return keep


def finetune(model, processor, examples: list, steps: int, lr: float, batch_size: int, seed: int = 0,
             prior: dict | None = None, mode: str = "adaptive_cosine", alpha: float = 0.0,
             progress=None, cancel=None, normalize_delta: bool = True, layers: list[int] | None = None) -> list[float]:
    """Train in place; returns the loss of every step. With a prior, DRIFT hooks are attached
    (also at alpha 0, so that alpha 0 is provably the plain fine-tune) and removed at the end.
    layers: [a, b] trains those decoder layers only (trainable_parameters)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = trainable_parameters(model, layers)
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
    """vlm, reasoner and the validated drift settings from a recipe file; `data` resolved like the
    model refs (the working folder, then the recipe's), and named under the recipe's folder when missing."""
    d, here = read_yaml(path)
    for k in ("vlm", "reasoner"):
        if not isinstance(d.get(k), str):
            raise LabError(f"recipe key {k!r} is missing or not a string")
    drift = drift_settings(d.get("drift"))
    if drift["data"] is not None:
        found = resolve_ref(drift["data"], here)
        drift["data"] = found if Path(found).expanduser().exists() else str(here / Path(drift["data"]).expanduser())
    return {"vlm": resolve_ref(d["vlm"], here), "reasoner": resolve_ref(d["reasoner"], here), "drift": drift}


def run_drift(spec: dict, out_dir, device: str = "cpu", progress=None, cancel=None,
              data: TrainingData | None = None) -> DriftResult:
    """Load the VLM, train (DRIFT or plain when alpha is 0) and save to out_dir atomically.
    data: training_data(spec) when the caller has it already; it is read (and refused) before any load."""
    s = spec["drift"]
    data = data or training_data(spec)
    layers = s.get("layers")
    drift_memory.check_room(spec["vlm"], spec["reasoner"], device, layers)  # before anything loads
    with AtomicFolder(out_dir) as tmp:
        prior = compute_prior(spec["vlm"], spec["reasoner"], layers=layers)
        # float32: the fine-tune's optimizer steps need the precision whatever the checkpoint's dtype.
        model, processor = load_model(spec["vlm"], device, dtype="float32")
        t0 = time.time()
        losses = finetune(model, processor, data.examples, int(s["steps"]), float(s["lr"]), int(s["batch_size"]),
                          int(s["seed"]), prior, s["mode"], float(s["alpha"]), progress, cancel,
                          bool(s["normalize_delta"]), layers)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        seconds = time.time() - t0
        shown = {k: v for k, v in s.items() if k != "data"}  # a server's upload path says nothing to a reader
        (tmp / "README.md").write_text(
            f"# DRIFT fine-tune\n\nBase VLM: `{spec['vlm']}`\nReasoner (prior): `{spec['reasoner']}`\n\n"
            f"Data: {data.source} (sha256 {data.digest})\n\nSettings: {shown}\n\n"
            f"Steps: {len(losses)}, first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}, {seconds:.1f} s\n")
    return DriftResult(folder=str(out_dir), vlm=str(spec["vlm"]), reasoner=str(spec["reasoner"]), settings=dict(s),
                       losses=tuple(losses), seconds=seconds)


def main_drift(args) -> int:
    check_device(args.device)
    spec = load_drift_recipe(args.recipe)
    inputs = (spec["vlm"], spec["reasoner"], args.recipe, *([spec["drift"]["data"]] if spec["drift"]["data"] else []))
    guard_output(args.out_dir, inputs)  # run_drift's folder does not know the inputs
    data = training_data(spec)
    # closed as any exception leaves: an interrupt's one line is then the last one on the terminal
    with tqdm(total=spec["drift"]["steps"], desc="drift", disable=args.no_progress, file=sys.stderr) as bar:

        def progress(done, total, msg):
            bar.n = done
            bar.set_postfix_str(msg.split(", ")[-1])
            bar.refresh()

        result = run_drift(spec, args.out_dir, args.device, progress, data=data)
    print(f"wrote {args.out_dir}: {result.steps} steps on {data.source} in {result.seconds:.1f} s, "
          f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}")
    return 0
