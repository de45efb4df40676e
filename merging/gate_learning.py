"""FRISM's gates learned without labels (the method: merging/methods/frism.py; the pieces the gates
scale: merging/subspace_gates.py; the math and every choice: docs/METHODS.md, `## frism`).

The VLM (a copy of its own: a live model is never touched; float32 on a CPU, the checkpoint's dtype on a
GPU) answers perception prompts greedily (the bundled family's scenes, or the recipe's `prompts:` file); teacher-forced, those answers give its next-token distributions p on the answer tokens.
The gates g = sigmoid(theta) then minimise, by Adam,

  L(g) = KL(p || q_g) - beta * R(g)

q_g the distributions of the model with every gated matrix at W_v + delta(g) (one functional
forward, the weights themselves untouched), R the share of the reasoner's spectral mass injected.
The learned gates are kept on disk under a key of everything they depend on, so a merge to disk
and the same merge in place use the same gates, and a repeat learns nothing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merging import lab_cache, subspace_gates
from merging.checkpoint import Checkpoint
from merging.errors import Cancelled, LabError
from merging.finetune import build_batch, is_toy_family
from merging.gate_memory import check_room, learning_bytes, learning_dtype
from merging.inplace import map_parameters
from merging.item_file import read_items, set_digest
from merging.loading import load_model, prompt, tokenizer_of, user_turn
from tasks import toydata as td

INIT = 0.5  # every gate before learning (theta = logit(INIT)), and with steps 0
LR = 0.1  # Adam on theta
BATCH = 8  # prompts per step
SMALL = 2**30  # learning holdings below this pass a step's prompts together (see per_pass)
MAX_NEW_TOKENS = 24  # the VLM's answers, as long as the eval suites let it answer
LABEL_CAP = 2 * MAX_NEW_TOKENS  # answer tokens a prompt's KL reads (an answer re-encoded can be longer)
PROMPT_SEED = 50_000  # the toy perception scenes' own seed (the eval suites and the leaderboard's dev use others)
CACHE_VERSION = "2"


@dataclass
class Learned:
    """What learning gave: canonical matrix -> one gate per piece (empty with steps 0: every gate
    INIT), the KL per answer token at the first and the learned gates, R at the learned gates, the
    loss of every step, the seconds learning took (of the run that learned them, when cached)."""

    gates: dict[str, list[float]] = field(default_factory=dict)
    kl_start: float | None = None
    kl_end: float | None = None
    injected: float | None = None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    examples: int = 0
    cached: bool = False


@dataclass
class Setup:
    """One learning run's inputs: the triple's refs and layouts, the gated matrices' canonical names,
    the knobs (rank, groups, beta, steps, examples), the recipe's seed, the device."""

    refs: dict
    layouts: dict
    names: list[str]
    knobs: dict
    seed: int
    device: str
    fingerprints: dict | None = None
    prompts: str | None = None  # a JSONL of image + question; None: the bundled family's scenes


# ------------------------------------------------------------------------------------- the data
def perception_prompts(n: int, seed: int, prompts: str | None = None) -> list[tuple]:
    """(image or None, question) pairs: the first n items of the `prompts` file (answers unused), or n toy
    perception prompts from their own seed (no eval item, no label used)."""
    if prompts:
        return [(it.get("pil"), it["question"]) for it in read_items(prompts, limit=n)]
    rng = random.Random(PROMPT_SEED + int(seed))
    out = []
    for _ in range(n):
        scene = td.random_scene(rng)
        out.append((td.render(scene), td.perception_item(scene, rng.choice(td.PERCEPTION_KINDS)).question))
    return out


@torch.no_grad()
def vlm_answers(model, proc, prompts: list[tuple]) -> list[str]:
    """The VLM's greedy answers: the self-distillation targets (no label is read)."""
    tok = tokenizer_of(proc)
    side, tok.padding_side = tok.padding_side, "left"
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), BATCH):
            chunk = prompts[i:i + BATCH]
            texts = [prompt(proc, [user_turn(q, img is not None)]) for img, q in chunk]
            # nested per prompt, as merging.finetune.build_batch: some processors count images per prompt
            kw = ({"images": [[img] if img is not None else [] for img, _ in chunk]}
                  if any(img is not None for img, _ in chunk) else {})
            enc = proc(text=texts, padding=True, return_tensors="pt", add_special_tokens=False, **kw)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            answers += [a.strip() for a in tok.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions whose logits predict an answer token in some row (labels[:, j + 1])."""
    return (labels[:, 1:] != -100).any(0).nonzero().flatten()


def answer_logp(kept: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log-probabilities at the positions that predict an answer token, from the logits at
    answer_positions(labels) only: (tokens, vocab), row by row as logits[:, :-1][labels[:, 1:] != -100]."""
    mask = (labels[:, 1:] != -100)[:, answer_positions(labels)]
    return torch.log_softmax(kept[mask].float(), dim=-1)


@functools.cache
def _keeps_logits(cls) -> bool:
    """Whether a model class's forward takes logits_to_keep (asked once per class, not per prompt)."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def kept_logits(model, inputs: dict, labels: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """The logits at answer_positions(labels) alone (the vocabulary projection of the other positions,
    and its gradient, are never formed), with PARAMS in place of the model's own (a functional forward)."""
    at = answer_positions(labels)
    if not _keeps_logits(type(model)):  # every VLM class in use has logits_to_keep
        kw, pick = inputs, True
    else:
        kw, pick = {**inputs, "logits_to_keep": at}, False
    out = (torch.func.functional_call(model, params, args=(), kwargs=kw) if params else model(**kw)).logits
    return out[:, at] if pick else out


def kl_sum(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the answer tokens (divided by a step's token count by the caller)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()


def _capped(labels: torch.Tensor) -> torch.Tensor:
    """Only each row's first LABEL_CAP answer tokens stay labels."""
    kept = (labels != -100).cumsum(1) <= LABEL_CAP
    return torch.where(kept, labels, torch.full_like(labels, -100))


def per_pass(s: Setup) -> int:
    """**[choice]** Prompts per forward and backward. A real VLM's step takes its BATCH prompts one at a time,
    their gradients adding up, so the activations held are one prompt's (all 8 at once would hold tens
    of GiB at 7B); a small one's go together (the bundled family learns in 5 s instead of 9 on 2 cores,
    the same gates to 1e-7)."""
    return BATCH if learning_bytes(s) < SMALL else 1


def distillation_batches(model, proc, n: int, seed: int, file: str | None = None,
                         micro: int = 1) -> list[tuple[dict, torch.Tensor]]:
    """(model inputs with labels, the VLM's answer log-probabilities, kept on the CPU) per MICRO prompts."""
    prompts = perception_prompts(n, seed, file)
    answers = vlm_answers(model, proc, prompts)
    out = []
    for i in range(0, len(prompts), micro):
        b = build_batch(proc, [(img, q, a) for (img, q), a in zip(prompts[i:i + micro], answers[i:i + micro])])
        b = {k: v.to(model.device) for k, v in b.items()}
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(model.dtype)
        labels = _capped(b.pop("labels"))
        with torch.no_grad():
            teacher = answer_logp(kept_logits(model, b, labels), labels)
        out.append(({**b, "labels": labels}, teacher.cpu()))
    return out


# --------------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    return lab_cache.root() / "frism_gates"


def cache_key(s: Setup) -> str | None:
    """Everything learned gates depend on, hashed; None without the triple's fingerprints."""
    if not s.fingerprints:
        return None
    what = [CACHE_VERSION, dict(sorted(s.fingerprints.items())), {k: s.knobs[k] for k in sorted(s.knobs)},
            s.seed, sorted(s.names), INIT, LR, BATCH, per_pass(s), MAX_NEW_TOKENS, LABEL_CAP, PROMPT_SEED, learning_dtype(s.device)]
    if s.prompts:  # the prompts' bytes and images, not their path
        what.append(set_digest(s.prompts))
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:32]


def _cached(key: str | None) -> Learned | None:
    path = cache_dir() / f"{key}.json" if key else None
    if path is None or not path.is_file():
        return None
    try:
        return Learned(**{**lab_cache.read_json(path), "cached": True})
    except (OSError, ValueError, TypeError):
        path.unlink(missing_ok=True)  # never trusted when it does not read back
        return None


def _store(key: str | None, learned: Learned) -> None:
    if key is None:
        return
    path = cache_dir() / f"{key}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(asdict(learned)))
        os.replace(tmp, path)  # whole or absent, never half written
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache that cannot be written only costs a repeat its learning


# ------------------------------------------------------------------------------------ learning
@dataclass
class _Matrix:
    """One gated matrix during learning: its parameter in the loaded model, W_v, tau, its pieces."""

    param: str
    w_v: torch.Tensor
    tau: torch.Tensor
    pieces: subspace_gates.Pieces


def _matrices(s: Setup, model) -> dict[str, _Matrix]:
    """Each gated matrix's task vector (read from the reasoner's and the base's files, its pieces found in
    float32) kept in the model's dtype."""
    lay = s.layouts
    with Checkpoint.open(s.refs["vlm"]) as ck:
        shapes = {c: ck.shape(lay["vlm"].lm[c]) for c in s.names}
    params = map_parameters(model, shapes)
    named = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    with Checkpoint.open(s.refs["reasoner"]) as ckr, Checkpoint.open(s.refs["base"]) as ckb:
        for c in s.names:
            tau = (ckr.get(lay["reasoner"].lm[c]).float() - ckb.get(lay["base"].lm[c]).float()).to(s.device)
            p = subspace_gates.pieces(tau, s.knobs["rank"], s.knobs["groups"])
            p.vs = [v.to(model.dtype) for v in p.vs]
            out[c] = _Matrix(params[c], named[params[c]].detach(), tau.to(model.dtype), p)
    return out


def _gated_weights(mats: dict[str, _Matrix], gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every gated matrix at W_v + delta(g), by its parameter's name: what the functional forward uses."""
    return {m.param: m.w_v + subspace_gates.delta(m.tau, m.pieces, gates[c]) for c, m in mats.items()}


def _student_kl_sum(model, over: dict, batch: dict, teacher: torch.Tensor) -> torch.Tensor:
    """KL summed over the answer tokens of the model with the gated weights OVER in place."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student = answer_logp(kept_logits(model, inputs, batch["labels"], over), batch["labels"])
    return kl_sum(teacher.to(student.device), student)


def _split(theta: torch.Tensor, mats: dict[str, _Matrix]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for c, m in mats.items():
        out[c] = torch.sigmoid(theta[at:at + m.pieces.gates])
        at += m.pieces.gates
    return out


@torch.enable_grad()  # InPlaceMerger.apply runs under no_grad
def learn(s: Setup, progress=None, cancel=None, release=None) -> Learned:
    """The gates of s.names (steps 0: none learned, every gate INIT). progress(done, total, message)
    after each step; cancel() -> True raises Cancelled; release(), when given, is called before the
    room is checked and the VLM copy loads, and only when the gates are learned (not from the cache)."""
    if cancel is not None and cancel():
        raise Cancelled()
    if int(s.knobs["steps"]) == 0 or not s.names:
        return Learned()
    if not s.prompts and not is_toy_family(s.refs["vlm"]):
        raise LabError(f"frism learns its gates from the VLM's answers to perception prompts: give the recipe "
                       f"'prompts: FILE.jsonl' (image + question a line) for {s.refs['vlm']} (the built-in scenes "
                       "are the bundled toy family's), or set 'steps: 0' (every gate 0.5, nothing learned)")
    key = cache_key(s)
    found = _cached(key)
    if found is not None and all(len(found.gates.get(c, ())) > 0 for c in s.names):
        return found
    if release is not None:
        release()
    check_room(s)
    t0 = time.time()
    model, proc = load_model(s.refs["vlm"], s.device, dtype=learning_dtype(s.device))
    for p in model.parameters():
        p.requires_grad_(False)
    mats = _matrices(s, model)
    micro = per_pass(s)
    batches = distillation_batches(model, proc, int(s.knobs["examples"]), s.seed, s.prompts, micro)
    total = sum(m.pieces.gates for m in mats.values())
    theta = torch.full((total,), math.log(INIT / (1 - INIT)), device=s.device, requires_grad=True)
    energy = {c: torch.tensor(m.pieces.energy, device=s.device) for c, m in mats.items()}
    opt = torch.optim.Adam([theta], lr=LR)
    opt.zero_grad(set_to_none=True)
    learned = Learned(examples=sum(b["input_ids"].shape[0] for b, _ in batches))
    learned.kl_start = _mean_kl(model, mats, _split(theta.detach(), mats), batches)
    steps, beta = int(s.knobs["steps"]), float(s.knobs["beta"])
    per_step = min(len(batches), max(1, BATCH // micro))
    for step in range(steps):
        if cancel is not None and cancel():
            raise Cancelled()
        group = [batches[(step * per_step + j) % len(batches)] for j in range(per_step)]
        div = _accumulate(model, mats, _split(theta, mats), group, cancel)
        gates = _split(theta, mats)
        reward = beta * subspace_gates.injected([energy[c] for c in mats], [gates[c] for c in mats])
        (-reward).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        learned.losses.append(div - float(reward.detach()))
        if progress is not None:
            progress(step + 1, steps, f"frism gates: step {step + 1}/{steps}, KL {div:.4f}")
    final = _split(theta.detach(), mats)
    learned.kl_end = _mean_kl(model, mats, final, batches)
    learned.injected = float(subspace_gates.injected([energy[c] for c in mats], [final[c] for c in mats]))
    learned.gates = {c: [float(x) for x in g.cpu()] for c, g in final.items()}
    learned.seconds = time.time() - t0
    _store(key, learned)
    return learned


def _accumulate(model, mats: dict[str, _Matrix], gates: dict[str, torch.Tensor], group: list, cancel=None) -> float:
    """One step's KL per answer token over GROUP's prompts, its gradient added into the gates' (one prompt's
    activations held at a time; the gated weights are built once and serve every prompt)."""
    over = _gated_weights(mats, gates)
    tokens = max(1, sum(t.shape[0] for _, t in group))
    div = 0.0
    for b, t in group:
        if cancel is not None and cancel():
            raise Cancelled()
        part = _student_kl_sum(model, over, b, t) / tokens
        part.backward(retain_graph=True)  # keeps the gated weights' graph for the next prompt
        div += float(part.detach())
        del part  # its activations go now, not when the next prompt's forward is done
    return div


@torch.no_grad()
def _mean_kl(model, mats, gates, batches) -> float:
    """The KL per answer token over every prompt."""
    over = _gated_weights(mats, gates)
    total = sum(float(_student_kl_sum(model, over, b, t)) for b, t in batches)
    return total / max(1, sum(t.shape[0] for _, t in batches))
