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

import hashlib
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
from merging.inplace import map_parameters
from merging.item_file import read_items, set_digest
from merging.loading import load_model, prompt, tokenizer_of, user_turn
from merging.memory_plan import free_memory
from tasks import toydata as td

INIT = 0.5  # every gate before learning (theta = logit(INIT)), and with steps 0
LR = 0.1  # Adam on theta
BATCH = 8  # prompts per step
MAX_NEW_TOKENS = 24  # the VLM's answers, as long as the eval suites let it answer
PROMPT_SEED = 50_000  # the toy perception scenes' own seed (the eval suites and the leaderboard's dev use others)
CACHE_VERSION = "1"


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


def answer_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log-probabilities at the positions that predict an answer token: (tokens, vocab)."""
    mask = labels[:, 1:] != -100
    return torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)


def kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per answer token, averaged over the tokens."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


def distillation_batches(model, proc, n: int, seed: int, file: str | None = None) -> list[tuple[dict, torch.Tensor]]:
    """(model inputs, the VLM's answer log-probabilities) per batch of BATCH prompts."""
    prompts = perception_prompts(n, seed, file)
    n = len(prompts)
    answers = vlm_answers(model, proc, prompts)
    out = []
    for i in range(0, n, BATCH):
        b = build_batch(proc, [(img, q, a) for (img, q), a in zip(prompts[i:i + BATCH], answers[i:i + BATCH])])
        b = {k: v.to(model.device) for k, v in b.items()}
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(model.dtype)
        labels = b.pop("labels")
        with torch.no_grad():
            teacher = answer_logp(model(**b).logits, labels)
        out.append(({**b, "labels": labels}, teacher))
    return out


# --------------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    return lab_cache.root() / "frism_gates"


def cache_key(s: Setup) -> str | None:
    """Everything learned gates depend on, hashed; None without the triple's fingerprints."""
    if not s.fingerprints:
        return None
    what = [CACHE_VERSION, dict(sorted(s.fingerprints.items())), {k: s.knobs[k] for k in sorted(s.knobs)},
            s.seed, sorted(s.names), INIT, LR, BATCH, MAX_NEW_TOKENS, PROMPT_SEED, learning_dtype(s.device)]
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


def _student_kl(model, mats: dict[str, _Matrix], gates: dict[str, torch.Tensor], batch: dict,
                teacher: torch.Tensor) -> torch.Tensor:
    """KL of the model with every gated matrix at W_v + delta(g) (a functional forward)."""
    over = {m.param: m.w_v + subspace_gates.delta(m.tau, m.pieces, gates[c]) for c, m in mats.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = torch.func.functional_call(model, over, args=(), kwargs=inputs).logits
    return kl(teacher, answer_logp(logits, batch["labels"]))


def _split(theta: torch.Tensor, mats: dict[str, _Matrix]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for c, m in mats.items():
        out[c] = torch.sigmoid(theta[at:at + m.pieces.gates])
        at += m.pieces.gates
    return out


def learning_dtype(device: str) -> str:
    """**[choice]** float32 on a CPU (the toy family learns in minutes there); on a GPU the checkpoint's own
    dtype (bfloat16 for the public 7B pairs), VLM and task vectors alike, halving what learning holds; the
    gates themselves, Adam's state and the KL stay float32, and the merge still uses the exact tau_r."""
    return "float32" if torch.device(device).type == "cpu" else "auto"


def learning_bytes(s: Setup) -> int:
    """What learning holds on its device besides activations: its own copy of the VLM and one task vector
    per gated matrix, in the learning dtype."""
    with Checkpoint.open(s.refs["vlm"]) as ck:
        def size(name: str) -> int:
            return 4 if learning_dtype(s.device) == "float32" else ck.dtype(name).itemsize

        vlm = sum(math.prod(ck.shape(n)) * size(n) for n in ck.names())
        gated = sum(math.prod(ck.shape(s.layouts["vlm"].lm[c])) * size(s.layouts["vlm"].lm[c]) for c in s.names)
    return vlm + gated


def check_room(s: Setup) -> None:
    """LabError before anything loads when learning would not fit the device's free memory (a 7B pair
    in bfloat16 holds about 28 GiB for every layer's gates: a 24 GB card learns part of the layers)."""
    need = learning_bytes(s)
    free, _ = free_memory(s.device)
    if need > 0.9 * free:
        raise LabError(f"frism: learning the gates of {len(s.names)} matrices holds about {need / 2**30:.1f} GiB "
                       f"on {s.device} (its own copy of the VLM and the task vectors), {free / 2**30:.1f} GiB is "
                       "free: merge fewer layers ('layers: [a, b]'), free the device, or set 'steps: 0'")


@torch.enable_grad()  # InPlaceMerger.apply runs under no_grad
def learn(s: Setup, progress=None, cancel=None) -> Learned:
    """The gates of s.names (steps 0: none learned, every gate INIT). progress(done, total, message)
    after each step; cancel() -> True raises Cancelled."""
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
    check_room(s)
    t0 = time.time()
    model, proc = load_model(s.refs["vlm"], s.device, dtype=learning_dtype(s.device))
    for p in model.parameters():
        p.requires_grad_(False)
    mats = _matrices(s, model)
    batches = distillation_batches(model, proc, int(s.knobs["examples"]), s.seed, s.prompts)
    total = sum(m.pieces.gates for m in mats.values())
    theta = torch.full((total,), math.log(INIT / (1 - INIT)), device=s.device, requires_grad=True)
    energy = {c: torch.tensor(m.pieces.energy, device=s.device) for c, m in mats.items()}
    opt = torch.optim.Adam([theta], lr=LR)
    learned = Learned(examples=sum(b["input_ids"].shape[0] for b, _ in batches))
    learned.kl_start = _mean_kl(model, mats, _split(theta.detach(), mats), batches)
    steps, beta = int(s.knobs["steps"]), float(s.knobs["beta"])
    for step in range(steps):
        if cancel is not None and cancel():
            raise Cancelled()
        batch, teacher = batches[step % len(batches)]
        gates = _split(theta, mats)
        div = _student_kl(model, mats, gates, batch, teacher)
        loss = div - beta * subspace_gates.injected([energy[c] for c in mats], [gates[c] for c in mats])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        learned.losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps, f"frism gates: step {step + 1}/{steps}, KL {float(div.detach()):.4f}")
    final = _split(theta.detach(), mats)
    learned.kl_end = _mean_kl(model, mats, final, batches)
    learned.injected = float(subspace_gates.injected([energy[c] for c in mats], [final[c] for c in mats]))
    learned.gates = {c: [float(x) for x in g.cpu()] for c, g in final.items()}
    learned.seconds = time.time() - t0
    _store(key, learned)
    return learned


@torch.no_grad()
def _mean_kl(model, mats, gates, batches) -> float:
    return sum(float(_student_kl(model, mats, gates, b, t)) for b, t in batches) / len(batches)
