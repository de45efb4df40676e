"""Accuracy on the toy eval suites (`python -m analysis eval MODEL_DIR`).

Suites live in assets/toy/eval/<suite>.jsonl, one item a line:
  {"id": ..., "question": ..., "answer": "7", "target": "... the answer is 7 .", "image": "images/x.png" | null}
A user's own file (`--suite-file items.jsonl`, analysis.eval_file) is scored the same way as suite "custom".
A model answers greedily; its final answer is the X of the first "the answer is X" in the
generation (`toydata.parse_answer`), scored by exact match. A text-only model skips the image
suites (perception, visual_math) unless one is asked for by name, which is an error.

`evaluate(...)` takes a model folder, or a model already loaded (with its processor or
tokenizer), so layer knockout and the app can score a model they hold in memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image

from analysis import intervals
from analysis.eval_file import read_items
from merging.device import check_device
from merging.errors import LabError

# load_model is re-exported: analysis.leaderboard and the tests load through this module.
from merging.loading import is_vision, load_model, prompt, tokenizer_of, user_turn
from tasks.toydata import ANSWER_RE, parse_answer

SUITES = ("perception", "visual_math", "text_math")
IMAGE_SUITES = ("perception", "visual_math")
EVAL_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy" / "eval"
MAX_NEW_TOKENS = 24


def load_suite(name: str, limit: int | None = None, eval_dir: Path | str | None = None) -> list[dict]:
    """The items of one suite (the first `limit` of them), with images opened as PIL."""
    if name not in SUITES:
        raise LabError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    root = Path(eval_dir) if eval_dir is not None else EVAL_DIR
    path = root / f"{name}.jsonl"
    if not path.is_file():
        raise LabError(f"eval suite file not found: {path}")
    items = []
    with path.open() as f:
        for line in f:
            if line.strip():
                items.append(json.loads(line))
            if limit is not None and len(items) >= limit:
                break
    for item in items:
        if item.get("image"):
            with Image.open(root / item["image"]) as im:
                item["pil"] = im.convert("RGB")
    return items


def is_vlm(model) -> bool:
    return is_vision(model.config)


class AnswerGiven:
    """A stopping criterion: a row is done once its text holds a final "the answer is X" (X followed by
    a character that cannot extend it), so parse_answer's result can no longer change. Exact-match
    scoring only needs that much; a batch stops when every row is done or at EOS."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [(m := ANSWER_RE.search(t)) is not None and m.end() < len(t) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model, proc, questions: list[str], images: list | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
    stop_at_answer: bool = False,
):
    """Greedy answers to a batch of questions (each with an image when `images` is given).
    stop_at_answer: a row stops once its final answer is written (AnswerGiven): the same scores,
    shorter outputs (knockout, where no output is shown)."""
    tok = tokenizer_of(proc)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        prompts = [prompt(proc, [user_turn(q, images is not None)]) for q in questions]
        if images is not None:
            batch = proc(
                text=prompts, images=images, padding=True, return_tensors="pt", add_special_tokens=False
            )
        else:
            batch = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    finally:
        tok.padding_side = old_side
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    stop = [AnswerGiven(tok, batch["input_ids"].shape[1])] if stop_at_answer else None
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        stopping_criteria=stop,
    )
    return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _resolve(model_or_dir, processor, device):
    if isinstance(model_or_dir, (str, Path)):
        return load_model(model_or_dir, device)
    if isinstance(model_or_dir, tuple):
        return model_or_dir
    if processor is None:
        raise LabError("evaluate() got a loaded model without its processor or tokenizer")
    return model_or_dir, processor


def _has_image(item: dict) -> bool:
    return item.get("pil") is not None


def _chunks(items: list[dict], batch_size: int):
    """Batches of at most batch_size consecutive items that all have an image or all have none."""
    chunk: list[dict] = []
    for it in items:
        if chunk and (len(chunk) >= batch_size or _has_image(chunk[0]) != _has_image(it)):
            yield chunk
            chunk = []
        chunk.append(it)
    if chunk:
        yield chunk


def score(model, proc, items: list[dict], on_batch: Callable[[int], None] | None = None,
          batch_size: int = 64, stop_at_answer: bool = False) -> list[dict]:
    """One record per item (id, question, answer, output, correct), in order; an item with "pil"
    is asked with its image. on_batch(n) after each batch of n items."""
    recs = []
    for chunk in _chunks(items, batch_size):
        imgs = [it["pil"] for it in chunk] if _has_image(chunk[0]) else None
        outs = generate(model, proc, [it["question"] for it in chunk], imgs, stop_at_answer=stop_at_answer)
        for it, text in zip(chunk, outs):
            ok = parse_answer(text) == str(it["answer"]).lower()
            recs.append({"id": it["id"], "question": it["question"], "answer": it["answer"], "output": text,
                         "correct": ok})
        if on_batch is not None:
            on_batch(len(chunk))
    return recs


def _suites(names, vision: bool, extra: dict | None, limit, eval_dir) -> dict[str, list[dict]]:
    """suite name -> items: the bundled suites asked for, then the given ones (e.g. "custom")."""
    if names is None:
        names = [s for s in SUITES if vision or s not in IMAGE_SUITES]
    else:
        names = [names] if isinstance(names, str) else list(names)
        for s in names:
            if s in IMAGE_SUITES and not vision:
                raise LabError(f"suite {s} needs images but the model is text-only")
    loaded = {s: load_suite(s, limit, eval_dir) for s in names}
    for s, items in (extra or {}).items():
        with_image = sum(map(_has_image, items))
        if with_image and not vision:
            raise LabError(f"{with_image} item(s) of the {s} suite have an image but the model is text-only")
        loaded[s] = items
    return loaded


def evaluate(
    model_or_dir,
    suites: Iterable[str] | str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
    processor=None,
    batch_size: int = 64,
    eval_dir: Path | str | None = None,
    return_items: bool = False,
    extra: dict[str, list[dict]] | None = None,
    stop_at_answer: bool = False,
) -> dict:
    """suite -> accuracy in [0, 1].

    model_or_dir: a folder, a (model, processor_or_tokenizer) tuple, or a loaded model with
    `processor=`. suites: None for all (a text-only model skips the image suites). extra: more
    suites by name, their items already loaded (analysis.eval_file.read_items; scored whole, no
    limit). With return_items, the result is {"accuracy": {...}, "items": {suite: [per-item dicts]}}.
    stop_at_answer: each generation stops once its final answer is written (same scores, shorter outputs).
    """
    model, proc = _resolve(model_or_dir, processor, device)
    loaded = _suites(suites, is_vlm(model), extra, limit, eval_dir)
    total = sum(len(v) for v in loaded.values())
    done, accuracy, records = [0], {}, {}
    for s, items in loaded.items():
        def on_batch(n, s=s):
            done[0] += n
            if progress is not None:
                progress(done[0], total, f"{s}: {done[0]}/{total}")

        records[s] = score(model, proc, items, on_batch, batch_size, stop_at_answer)
        accuracy[s] = sum(r["correct"] for r in records[s]) / len(items) if items else 0.0
    return {"accuracy": accuracy, "items": records} if return_items else accuracy


def report(result: dict) -> dict:
    """The CLI's JSON: {suite: accuracy, ..., "ci95": {suite: [lo, hi]}, "n": {suite: items}} (Wilson
    intervals), from evaluate(..., return_items=True)."""
    out: dict = {k: round(v, 4) for k, v in result["accuracy"].items()}
    ivs = {s: intervals.accuracy([r["correct"] for r in recs]) for s, recs in result["items"].items()}
    out["ci95"] = {s: [round(iv["lo"], 4), round(iv["hi"], 4)] for s, iv in ivs.items()}
    out["n"] = {s: iv["n"] for s, iv in ivs.items()}
    return out


def main_eval(args) -> int:
    """Print {suite: accuracy} as JSON with each accuracy's 95% interval ("ci95") and item count ("n"):
    the bundled suites (or --suite), or with --suite-file the user's file as suite "custom" (plus
    --suite when both are given). A readable line per suite goes to stderr."""
    check_device(args.device)
    if args.suite is not None and args.suite not in SUITES:
        raise LabError(f"unknown suite {args.suite!r}; choose one of {', '.join(SUITES)}")
    suite_file = getattr(args, "suite_file", None)
    suites = [args.suite] if args.suite else ([] if suite_file else None)
    # the whole file is checked before the model loads: a bad line costs no model load
    extra = {"custom": read_items(suite_file, args.limit)} if suite_file else None
    # `python -m analysis --help` imports this module (the knockout analysis); a bad --suite is refused first.
    # lazy: transformers costs 0.9 s after torch (python -X importtime), only needed to load the model.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for the one line that says what went wrong
    try:
        loaded = load_model(args.model_dir, args.device)
    except LabError:
        raise
    except Exception as e:  # transformers raises many types for a bad config or tokenizer file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LabError(f"could not load the model in {args.model_dir} (bad config or tokenizer?): "
                       f"{type(e).__name__} {first}") from None
    result = evaluate(loaded, suites=suites, limit=args.limit, device=args.device, extra=extra, return_items=True)
    out = report(result)
    for s in result["accuracy"]:
        lo, hi = out["ci95"][s]
        print(f"{s}: {out[s]:.2f} [{lo:.2f}, {hi:.2f}] ({out['n'][s]} items, 95% Wilson interval)", file=sys.stderr)
    print(json.dumps(out))
    return 0
