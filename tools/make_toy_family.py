"""Regenerate the bundled toy model family (base, math, vlm) and its eval suites from nothing.

    python tools/make_toy_family.py [--out assets/toy] [--threads 1] [--base-threads 2] [--jobs 2] [--seed 0]
                                    [--smoke] [--resume]

Stages (all seeded, CPU, float32):
1. base: a small Llama LM pretrained from scratch on the templated text mixture (tools/toy/corpus.py).
2. math: the base fine-tuned briefly, at a low learning rate, on word problems with a short
   chain of thought ("there are 3 apples . 3 + 4 = 7 . the answer is 7 .").
3. vlm:  LLaVA around a copy of the base: first the vision tower and projector alone (LM frozen),
   then a short joint fine-tune with a low LM learning rate, on perception questions only.
4. eval/ and samples/: held-out suites and the app's sample images.
The base trains on --base-threads (2: both cores; the LM-only stages write the same bytes on 1 or
2 threads, measured). With --jobs 2 (the default) math then trains in a second process while this
one trains vlm (both start from the base); each is single-threaded (the VLM's bytes do depend on
the thread count), so the bytes are those of --jobs 1. Each folder is written
atomically. --smoke runs a handful of steps on tiny data (seconds) and writes loadable folders; CI
uses it.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tools.toy import corpus, evalset, models, vlm_data  # noqa: E402
from tools.toy.save import save_model  # noqa: E402
from tools.toy.train import collate, encode, expand_image, train  # noqa: E402
from tools.toy.vocab import build_tokenizer  # noqa: E402

STAMP = "toy_stage.json"


@dataclass(frozen=True)
class Plan:
    layers: int = 8  # the shipped family; an earlier family had 4 layers (--set layers=4 ...)
    batch: int = 48
    base_steps: int = 1500
    base_lr: float = 2e-3
    base_word_problems: float = 0.03  # share of solved word problems in the base's pretraining mixture
    math_steps: int = 300
    math_lr: float = 2e-4
    math_replay: float = corpus.REPLAY
    math_two_step: float = 0.5  # share of two-step word problems (groups summed first) in the math fine-tune
    compare: float = 0.2  # share of comparison questions in the base's scene chats and the VLM's questions
    vlm_batch: int = 48
    vision_steps: int = 1200
    vision_lr: float = 2e-3
    joint_steps: int = 400
    joint_lm_lr: float = 1e-4
    joint_vision_lr: float = 5e-4
    eval_items: int = 300


SMOKE = Plan(batch=4, vlm_batch=4, base_steps=3, math_steps=2, vision_steps=2, joint_steps=2, eval_items=4)


def text_batches(tok, draw, batch: int):
    def make(rng):
        pairs = []
        for _ in range(batch):
            example = draw(rng)
            pairs.append(encode(tok, example, None) if isinstance(example, str) else encode(tok, *example))
        return collate(pairs)

    return make


def vlm_batches(tok, image_processor, batch: int, compare: float = 0.0):
    def make(rng):
        images, pairs = [], []
        for _ in range(batch):
            image, prompt, answer = vlm_data.vlm_example(rng, compare)
            images.append(image)
            pairs.append(expand_image(*encode(tok, prompt, answer)))
        out = collate(pairs)
        out["pixel_values"] = image_processor(images, return_tensors="pt")["pixel_values"]
        return out

    return make


def stage_key(plan: Plan, seed: int, stage: str) -> dict:
    """What a stage's output depends on (its own and its upstream settings)."""
    fields = {
        "base": ("layers", "batch", "base_steps", "base_lr"),
        "math": ("math_steps", "math_lr", "math_replay"),
        "vlm": ("vlm_batch", "vision_steps", "vision_lr", "joint_steps", "joint_lm_lr", "joint_vision_lr"),
    }
    keys = fields["base"] + (fields[stage] if stage != "base" else ())
    key = {"stage": stage, "seed": seed, **{k: getattr(plan, k) for k in keys}}
    if plan.base_word_problems:  # only when used: the shipped family's stamps stay valid for --resume
        key["base_word_problems"] = plan.base_word_problems
    if plan.math_two_step and stage == "math":
        key["math_two_step"] = plan.math_two_step
    if plan.compare:
        key["compare"] = plan.compare
    return key


def _done(folder: Path, key: dict) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == key


def _save(folder: Path, key: dict, model, tok, processor=None) -> None:
    save_model(folder, model, tok, processor, extra={STAMP: json.dumps(key)})


STAGES = ("base", "math", "vlm", "eval")


def train_base(tok, plan: Plan, seed: int, log):
    """Stage 1: the base LM pretrained from scratch on the text mixture."""
    base = models.build_base(len(tok), seed, plan.layers)
    groups = [{"params": list(base.parameters()), "lr": plan.base_lr}]
    draw = lambda rng: corpus.base_text(rng, plan.base_word_problems, plan.compare)  # noqa: E731
    train(base, text_batches(tok, draw, plan.batch), groups, plan.base_steps, seed + 1, log=log, name="base")
    return base


def train_math(base, tok, plan: Plan, seed: int, log):
    """Stage 2: the math LLM, the base briefly fine-tuned on word problems (with replay)."""
    math = copy.deepcopy(base)
    groups = [{"params": list(math.parameters()), "lr": plan.math_lr}]
    draw = lambda rng: corpus.math_example(rng, plan.math_replay, plan.math_two_step, plan.compare)  # noqa: E731
    train(math, text_batches(tok, draw, plan.batch), groups, plan.math_steps, seed + 2, log=log, name="math")
    return math


def train_vlm(base, tok, processor, plan: Plan, seed: int, log):
    """Stage 3, the LLaVA recipe: vision tower + projector alone, then a joint fine-tune at a low LM rate."""
    vlm = models.build_vlm(base, seed + 3)
    make = vlm_batches(tok, processor.image_processor, plan.vlm_batch, plan.compare)
    vision = list(vlm.model.vision_tower.parameters()) + list(vlm.model.multi_modal_projector.parameters())
    lm = list(vlm.model.language_model.parameters()) + list(vlm.lm_head.parameters())
    train(vlm, make, [{"params": vision, "lr": plan.vision_lr}], plan.vision_steps, seed + 4, log=log,
          name="vlm-vision")
    groups = [{"params": vision, "lr": plan.joint_vision_lr}, {"params": lm, "lr": plan.joint_lm_lr}]
    train(vlm, make, groups, plan.joint_steps, seed + 5, log=log, name="vlm-joint")
    return vlm


def _start_math_child(out: Path, plan: Plan, seed: int, log) -> subprocess.Popen:
    """This script again, for the math stage alone, on the base just written (every Plan field passed)."""
    fields = [f"{k}={v}" for k, v in asdict(plan).items()]
    cmd = [sys.executable, __file__, "--out", str(out), "--seed", str(seed), "--threads", "1", "--jobs", "1",
           "--only", "math", "--set", *fields]
    log("[math] started in a second process: " + " ".join(cmd[1:6]) + " ...")
    return subprocess.Popen(cmd)


def _wait(child: subprocess.Popen) -> None:
    if child.wait() != 0:
        raise SystemExit(f"error: the math stage (second process) failed with exit code {child.returncode}")


def _base_stage(out: Path, tok, plan: Plan, seed: int, resume: bool, threads: int | None, log):
    """The base, reused when its folder carries the same stamp, else trained on `threads` threads."""
    from transformers import AutoModelForCausalLM

    key = stage_key(plan, seed, "base")
    if resume and _done(out / "base", key):
        log("[base] reused")
        return AutoModelForCausalLM.from_pretrained(out / "base").eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)  # nothing else runs yet: the base may use every core
    try:
        base = train_base(tok, plan, seed, log)
    finally:
        torch.set_num_threads(before)  # math and vlm: their own count (the VLM's bytes depend on it)
    _save(out / "base", key, base, tok)
    return base


def make_family(out: Path, plan: Plan, seed: int = 0, resume: bool = False, log=print,
                only: tuple[str, ...] = STAGES, jobs: int = 1,
                base_threads: int | None = None) -> dict[str, float]:
    """Train and write base/, math/, vlm/, eval/, samples/ under `out`.

    With resume, a stage whose folder carries the same stamp (settings + seed) is loaded
    instead of retrained; the stages are deterministic, so the result is the same. base_threads
    (default: the current thread count) applies to the base stage only.
    """
    timings, t0 = {}, time.time()
    tok = build_tokenizer(compare=plan.compare > 0)
    processor = models.build_processor(tok)

    base = _base_stage(out, tok, plan, seed, resume, base_threads, log)
    timings["base"] = time.time() - t0

    # math and vlm both start from the base and are independent: with jobs=2, math trains in a child
    # process (one thread, like this one, so the bytes do not change) while this one trains vlm.
    child, t_child = None, time.time()
    math_left = "math" in only and not (resume and _done(out / "math", stage_key(plan, seed, "math")))
    if jobs >= 2 and math_left and "vlm" in only:
        child, only = _start_math_child(out, plan, seed, log), tuple(s for s in only if s != "math")
    try:
        for stage in ("math", "vlm"):
            t, key = time.time(), stage_key(plan, seed, stage)
            if stage == "math" and child is not None:
                log("[math] training in a second process (it prints its own timing)")
                continue
            if stage not in only:
                log(f"[{stage}] skipped (--only)")
            elif resume and _done(out / stage, key):
                log(f"[{stage}] reused")
            elif stage == "math":
                _save(out / "math", key, train_math(base, tok, plan, seed, log), tok)
            else:
                _save(out / "vlm", key, train_vlm(base, tok, processor, plan, seed, log), tok, processor)
            timings[stage] = time.time() - t
    except BaseException:  # vlm failed or was interrupted: the child is ours to stop (it writes atomically)
        if child is not None:
            child.terminate()
            child.wait()
        raise
    if child is not None:
        _wait(child)
        timings["math+vlm"] = time.time() - t_child

    t = time.time()
    if "eval" in only:
        evalset.write_eval(out / "eval", plan.eval_items)
        evalset.write_samples(out / "samples")
    timings["eval"] = time.time() - t
    timings["total"] = time.time() - t0
    return timings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "toy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of the math and vlm stages (the VLM's bytes depend on it: 1 gives the shipped ones)")
    ap.add_argument("--base-threads", type=int, default=2,
                    help="threads of the base stage, which runs alone (its bytes are the same on 1 or 2, measured)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="2: math trains in a second process while vlm trains (same bytes; 1 for one process)")
    ap.add_argument("--smoke", action="store_true", help="a handful of steps on tiny data (seconds)")
    ap.add_argument("--only", nargs="*", choices=STAGES, default=list(STAGES),
                    help="run only these stages; the base is reused (with --resume) when not among them, so "
                         "math and vlm can train in two processes at once")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override Plan fields, e.g. --set math_lr=2e-4 layers=12 (for experiments)")
    ap.add_argument(
        "--resume", action="store_true", help="reuse stage folders stamped with the same settings"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    plan = SMOKE if args.smoke else Plan()
    for item in args.set:
        field, _, value = item.partition("=")
        if field not in Plan.__dataclass_fields__:
            ap.error(f"--set: Plan has no field {field!r}")
        plan = replace(plan, **{field: type(getattr(plan, field))(value)})
    if args.jobs < 1:
        ap.error("--jobs must be 1 or 2")
    if args.threads < 1 or args.base_threads < 1:
        ap.error("--threads and --base-threads must be at least 1")
    if "base" not in args.only and not _done(Path(args.out) / "base", stage_key(plan, args.seed, "base")):
        ap.error("--only without base needs a finished base/ in --out with the same settings (use --resume)")
    timings = make_family(Path(args.out), plan, seed=args.seed, resume=args.resume or "base" not in args.only,
                          only=tuple(args.only), jobs=args.jobs, base_threads=args.base_threads,
                          log=lambda m: print(m, flush=True))
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
