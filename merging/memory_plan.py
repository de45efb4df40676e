"""Where the worker keeps each piece of a triple: on the device, in host RAM, or left in the files.

A merge in place needs, besides the live model, three things per decoder layer (a "unit"; the
LM tensors outside the layers are one more unit, the vocabulary tensors a last one):
- merged: the new tensors of the live merge. Placed on the device, the model's loaded tensors
  stay untouched and serve as the originals: restoring the VLM, or answering the original pane,
  is a pointer exchange (no copy). Otherwise the merge is written over the loaded tensors, and
  the originals must be copied first, to host RAM or (no room) re-read from the VLM's files.
- stash: where a merge waits while the original VLM answers, so the next turn needs no re-merge.
  On the device for pointer units (the same memory the live merge had), in host RAM otherwise.
- inputs: the reasoner's and base's tensors, read at every merge. On the device or in host RAM
  (GPU only; copies in the checkpoint's dtype, exact), else read from the files at merge time
  (the page cache serves them; on a CPU a resident copy costs the same memory for no speed).

The greedy order says what matters most: the live model must fit the device (else the triple is
refused before anything is loaded); then pointer units layer by layer, so pane swaps and
restores are free; then inputs on the device; then host RAM for what is left.
Bytes come from the checkpoints' headers (nothing is loaded), or from a shape for the README's
7B table. The same code plans the worker and prints the benchmark's plan_7b.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import psutil
import torch

from merging import recipe as recipe_mod
from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.errors import LabError
from merging.layout import VOCAB_TENSORS, split_canonical

GiB = 2**30
MAX_SETS = 4  # merged states kept at most (the live one included)
# A merged state beyond the one the two chat panes need (earlier slider positions) is kept only
# while it costs at most this much: a set is all the merged layers, so above that size a slider
# move's re-merge is cheaper than the memory (the worker then holds about 1.7x its model, not 3x).
EXTRA_SET_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Unit:
    """One decoder layer (layer >= 0), the other LM tensors (-1) or the vocabulary tensors (-2)."""

    layer: int
    changed: int  # bytes of its merged tensors in the serving dtype
    original: int  # bytes of the VLM's tensors in the checkpoint dtype (a restore copy)
    inputs: int  # bytes of the reasoner's and base's tensors in their checkpoint dtypes

    @property
    def label(self) -> str:
        return {-1: "final norm", -2: "vocabulary"}.get(self.layer, f"layer {self.layer}")


@dataclass(frozen=True)
class Footprint:
    """What a triple weighs: the live model in the serving dtype and its units."""

    label: str
    live: int
    units: tuple[Unit, ...]


@dataclass(frozen=True)
class Placement:
    layer: int
    merged: str  # "device": new tensors, the loaded ones are the originals; "in-place": over the loaded ones
    original: str  # "loaded" (pointer units), "host" (a copy) or "file" (re-read from the VLM's files)
    stash: str  # "device", "host" or "none" (the original pane then costs a re-merge)
    inputs: str  # "device", "host" or "file"


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    device_free: int
    host_free: int
    headroom: int
    footprint: Footprint
    placements: tuple[Placement, ...] = ()
    sets: int = 0  # merged states that can be kept (the live one included); 0 = none
    fits: bool = True
    problem: str = ""
    use: dict = field(default_factory=dict)  # "device" / "host" -> bytes the plan takes there

    def of(self, layer: int) -> Placement:
        for p in self.placements:
            if p.layer == layer:
                return p
        raise KeyError(layer)

    @property
    def instant_swap(self) -> bool:
        """Both chat panes answer without a re-merge."""
        return self.sets >= 1

    def held_inputs(self) -> int:
        """Bytes of the reasoner's and base's tensors the plan keeps on the device (on a CPU: in RAM),
        which the merger lets go of while a method learns (InPlaceMerger._release)."""
        size = {u.layer: u.inputs for u in self.footprint.units}
        return sum(size.get(p.layer, 0) for p in self.placements if p.inputs == "device")

    def lines(self) -> list[str]:
        """What sits where, for the app and the CLI."""
        fp, gib = self.footprint, (lambda b: f"{b / GiB:.2f} GiB")
        if not self.fits:
            return [self.problem]
        on = "host RAM" if self.device == "cpu" else self.device
        out = [f"live model: {gib(fp.live)} on {on} (+{gib(self.headroom)} kept free for generation)"]
        for what in ("merged", "original", "stash", "inputs"):
            groups: dict[str, list[int]] = {}
            for p in self.placements:
                groups.setdefault(getattr(p, what), []).append(p.layer)
            out.append(f"{what}: " + "; ".join(f"{_where(w, self.device)} ({_units(ls)})" for w, ls in groups.items()))
        out.append(f"in all: {gib(self.use.get('device', 0))} on the device, {gib(self.use.get('host', 0))} "
                   f"in host RAM; {self.sets} merged state(s) kept"
                   + ("" if self.instant_swap else "; the original pane re-merges after each turn (no room)"))
        return out

    def to_json(self) -> dict:
        return {"device": self.device, "device_free_gib": round(self.device_free / GiB, 2),
                "host_free_gib": round(self.host_free / GiB, 2), "fits": self.fits, "problem": self.problem,
                "live_gib": round(self.footprint.live / GiB, 2), "sets": self.sets,
                "use_gib": {k: round(v / GiB, 2) for k, v in self.use.items()},
                "placements": [asdict(p) for p in self.placements]}


def _where(w: str, device: str) -> str:
    if w == "device":
        return "host RAM (the CPU is the device)" if device == "cpu" else device
    return {"host": "host RAM", "file": "read from the files", "none": "not kept", "loaded": "the loaded tensors",
            "in-place": "over the loaded tensors"}.get(w, w)


def _units(layers: list[int]) -> str:
    dec = sorted(x for x in layers if x >= 0)
    parts = []
    if dec:
        runs, start = [], dec[0]
        for a, b in zip(dec, dec[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(("layer " if len(dec) == 1 else "layers ") + ", ".join(runs))
    parts += [Unit(x, 0, 0, 0).label for x in sorted(layers) if x < 0]
    return ", ".join(parts)


def default_headroom(device: str, live: int) -> int:
    """Memory kept free for activations and the KV cache of a chat turn."""
    return max(GiB // 2 if device == "cpu" else int(1.5 * GiB), live // 10)


class _Pools:
    """Bytes left on the device and in host RAM; on the CPU both names draw on one pool."""

    def __init__(self, cpu: bool, dev: int, host: int):
        self.cpu, self.left = cpu, {"device": dev, "host": dev if cpu else host}

    def room(self, where: str) -> int:
        return self.left["device" if self.cpu else where]

    def take(self, where: str, n: int) -> bool:
        key = "device" if self.cpu else where
        if n > self.left[key]:
            return False
        self.left[key] -= n
        return True


def _refusal(footprint: Footprint, device: str, device_free: int, host_free: int, headroom: int) -> MemoryPlan:
    cpu = device == "cpu"
    where = "host RAM" if cpu else f"{device} memory"
    need = footprint.live + headroom
    free = max(0, host_free if cpu else device_free)
    return MemoryPlan(device, device_free, host_free, headroom, footprint, fits=False, problem=(
        f"{footprint.label} needs {need / GiB:.1f} GiB of {where} ({footprint.live / GiB:.1f} GiB of weights "
        f"+ {headroom / GiB:.1f} GiB to generate) and {free / GiB:.1f} GiB is free: "
        f"free {(need - free) / GiB:.1f} GiB (close other programs using it) or choose a smaller pair"))


def plan(footprint: Footprint, device: str, device_free: int, host_free: int, headroom: int | None = None,
         max_sets: int = MAX_SETS, hold_inputs_below: int = EXTRA_SET_MAX_BYTES) -> MemoryPlan:
    """Place each unit's pieces (see the module's docstring). device_free / host_free: bytes free
    now, before the model is loaded. On the CPU the device is host RAM: one pool."""
    cpu = device == "cpu"
    headroom = default_headroom(device, footprint.live) if headroom is None else headroom
    dev = (host_free if cpu else device_free) - footprint.live - headroom
    if dev < 0:
        return _refusal(footprint, device, device_free, host_free, headroom)
    pools = _Pools(cpu, dev, host_free - GiB)  # on a GPU machine the process itself needs some host RAM
    units = footprint.units
    pointer = {}
    for u in units:  # decoder layers first, then the rest: pointer units where the device has room
        pointer[u.layer] = pools.take("device", u.changed)
        if not pointer[u.layer] and cpu:
            break  # one pool: whatever does not fit here fits nowhere
    copies = [u for u in units if not pointer.get(u.layer)]
    original = {u.layer: "loaded" for u in units if pointer.get(u.layer)}
    original.update({u.layer: "host" if pools.take("host", u.original) else "file" for u in copies})
    stash_bytes = sum(u.original for u in copies)  # merged values are exact in the checkpoint dtype
    stash_ok = pools.take("host", stash_bytes)
    stash = {u.layer: "device" if pointer.get(u.layer) else ("host" if stash_ok else "none") for u in units}
    inputs = {}
    # On a CPU the inputs are read from the files at each merge (the page cache holds them, outside the
    # process), unless all of them are under hold_inputs_below: then holding them costs less than the
    # reads (the toy family re-merges 3x faster).
    resident = cpu and sum(u.inputs for u in units) < hold_inputs_below
    for u in units:
        if cpu:
            inputs[u.layer] = "device" if resident and pools.take("device", u.inputs) else "file"
        else:
            inputs[u.layer] = next((w for w in ("device", "host") if pools.take(w, u.inputs)), "file")
    # More merged states while there is room: each costs the pointer units' bytes on the device
    # and the copy units' stash in host RAM.
    per_dev = sum(u.changed for u in units if pointer.get(u.layer))
    sets = 1 if stash_ok else 0
    while 0 < sets < max_sets and per_dev + stash_bytes <= EXTRA_SET_MAX_BYTES \
            and pools.room("device") >= per_dev + (stash_bytes if cpu else 0) and pools.room("host") >= stash_bytes:
        pools.take("device", per_dev)
        pools.take("host", stash_bytes)
        sets += 1
    placements = tuple(Placement(u.layer, "device" if pointer.get(u.layer) else "in-place", original[u.layer],
                                 stash[u.layer], inputs[u.layer]) for u in units)
    use = _use(footprint, placements, device, headroom, sets)
    return MemoryPlan(device, device_free, host_free, headroom, footprint, placements, sets, True, "", use)


def _use(footprint: Footprint, placements, device: str, headroom: int, sets: int) -> dict:
    """Bytes on the device and in host RAM once the live merge and `sets - 1` stashed ones are held."""
    byu = {u.layer: u for u in footprint.units}
    dev = footprint.live + headroom
    host = 0
    kept = max(sets, 1)
    for p in placements:
        u = byu[p.layer]
        if p.merged == "device":
            dev += u.changed * kept  # the live merge and the stashed ones
        else:
            host += u.original if p.original == "host" else 0
            host += u.original * kept if p.stash == "host" else 0
        dev += u.inputs if p.inputs == "device" else 0
        host += u.inputs if p.inputs == "host" else 0
    if device == "cpu":
        return {"device": 0, "host": dev + host}
    return {"device": dev, "host": host}


# ------------------------------------------------------------------------------------- footprints
def footprint_of(vlm_ck, layouts: dict, reasoner_ck=None, base_ck=None, serving_itemsize: int | None = None,
                 label: str = "this triple") -> Footprint:
    """From opened Checkpoints and their layouts (merging.compat.check_triple's). serving_itemsize:
    bytes per element of the loaded model's floating tensors (None: each tensor's own)."""

    def served(ck, name):
        dt = ck.dtype(name)
        if serving_itemsize and dt.is_floating_point:
            return math.prod(ck.shape(name)) * serving_itemsize
        return ck.nbytes(name)

    live = sum(served(vlm_ck, n) for n in vlm_ck.names())
    acc: dict[int, list[int]] = {}
    others = [(ck, layouts[r]) for r, ck in (("reasoner", reasoner_ck), ("base", base_ck)) if ck is not None]
    for c, actual in layouts["vlm"].lm.items():
        layer, _ = split_canonical(c)
        key = layer if layer is not None else (-2 if c in VOCAB_TENSORS else -1)
        row = acc.setdefault(key, [0, 0, 0])
        row[0] += served(vlm_ck, actual)
        row[1] += vlm_ck.nbytes(actual)
        row[2] += sum(ck.nbytes(lay.lm[c]) for ck, lay in others if c in lay.lm)
    order = sorted(k for k in acc if k >= 0) + [k for k in (-1, -2) if k in acc]
    return Footprint(label, live, tuple(Unit(k, *acc[k]) for k in order))


def footprint_of_shape(label: str, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int,
                       vision_params: int, tied: bool = False, itemsize: int = 2, bias: bool = True) -> Footprint:
    """A Qwen2/Llama-shaped VLM triple of checkpoint dtype `itemsize`, served in that dtype."""
    hd = hidden // heads
    kvd = kv_heads * hd
    per_layer = (2 * hidden * hidden + 2 * kvd * hidden + 3 * hidden * inter + 2 * hidden
                 + (hidden + 2 * kvd if bias else 0))
    vocab_params = vocab * hidden * (1 if tied else 2)
    lm = layers * per_layer + vocab_params + hidden
    b = itemsize
    units = [Unit(i, per_layer * b, per_layer * b, 2 * per_layer * b) for i in range(layers)]
    units += [Unit(-1, hidden * b, hidden * b, 2 * hidden * b), Unit(-2, vocab_params * b, vocab_params * b,
                                                                      2 * vocab_params * b)]
    return Footprint(label, (lm + vision_params) * b, tuple(units))


# Qwen2-VL-7B's shape (Qwen2-7B language model, a 0.68 B vision tower), bf16: the pair users bring.
QWEN2_VL_7B = dict(label="a 7B pair (Qwen2-VL-7B shape)", layers=28, hidden=3584, inter=18944, vocab=152064,
                   heads=28, kv_heads=4, vision_params=675_000_000)


CUDA_CONTEXT = GiB // 2  # what the CUDA context and the allocator's reserve take of a card before any model


def plan_7b(gpu_gib: float, host_gib: float) -> MemoryPlan:
    """The plan for a 7B pair on a card of gpu_gib (a "24 GB" card has 24 GiB) and host_gib of free RAM."""
    fp = footprint_of_shape(**QWEN2_VL_7B)
    return plan(fp, "cuda", int(gpu_gib * GiB) - CUDA_CONTEXT, int(host_gib * GiB))


# ------------------------------------------------------------------------------------- a triple
def free_memory(device: str) -> tuple[int, int]:
    """(bytes free on the device, bytes of host RAM available) right now."""
    host = int(psutil.virtual_memory().available)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), host
    return host, host


def plan_triple(vlm_ref: str, reasoner_ref: str, base_ref: str | None, device: str, serving_itemsize: int | None,
                loaded: bool = False, max_sets: int = MAX_SETS,
                freed: tuple[int, int] = (0, 0), limit: int | None = None,
                hold_inputs_below: int = EXTRA_SET_MAX_BYTES) -> MemoryPlan:
    """The memory plan of a triple from its checkpoints' headers. loaded: the VLM is already in
    memory, so its live bytes are counted as free again; freed: (device, host) bytes that another
    loaded triple gives back before this one loads; limit: host RAM the worker may use at most."""
    report = check_triple(vlm_ref, reasoner_ref, base_ref)
    report.raise_if_incompatible()
    refs = {"vlm": vlm_ref, "reasoner": reasoner_ref, "base": base_ref}
    cks = {r: Checkpoint.open(ref) for r, ref in refs.items() if ref}
    try:
        fp = footprint_of(cks["vlm"], report.layouts, cks["reasoner"], cks.get("base"),
                                      serving_itemsize, label=os.path.basename(os.path.normpath(str(vlm_ref))))
    finally:
        for ck in cks.values():
            ck.close()
    dev_free, host_free = free_memory(device)
    dev_free, host_free = dev_free + freed[0], host_free + freed[1]
    if limit is not None:  # the worker may use at most this much (a shared machine)
        host_free = min(host_free, limit)
        if torch.device(device).type == "cpu":
            dev_free = host_free
    if loaded:
        if torch.device(device).type == "cpu":
            host_free += fp.live
        dev_free += fp.live
    return plan(fp, "cpu" if torch.device(device).type == "cpu" else str(device), dev_free, host_free,
                max_sets=max_sets, hold_inputs_below=hold_inputs_below)


def main_plan(args) -> int:
    """`python -m merging plan RECIPE`: the plan of the recipe's triple on this machine's device,
    or on a card of --gpu-gib with --host-gib of RAM."""
    rec = recipe_mod.load(args.recipe)
    itemsize = None if args.device != "cpu" or args.gpu_gib else getattr(torch, args.cpu_dtype).itemsize
    if args.gpu_gib:
        report = check_triple(rec.vlm, rec.reasoner, rec.base)
        report.raise_if_incompatible()
        refs = {"vlm": rec.vlm, "reasoner": rec.reasoner, "base": rec.base}
        cks = {r: Checkpoint.open(x) for r, x in refs.items() if x}
        try:
            fp = footprint_of(cks["vlm"], report.layouts, cks["reasoner"], cks.get("base"), None,
                              label=os.path.basename(os.path.normpath(str(rec.vlm))))
        finally:
            for ck in cks.values():
                ck.close()
        host = int((args.host_gib or 48) * GiB)
        p = plan(fp, "cuda", int(args.gpu_gib * GiB) - CUDA_CONTEXT, host)
    else:
        p = plan_triple(rec.vlm, rec.reasoner, rec.base, args.device, itemsize)
    if not p.fits:
        raise LabError(p.problem)
    # cycle: method_needs reads gate_learning and drift_memory, which take free_memory from here
    from merging import method_needs

    free = (int(args.gpu_gib * GiB) - CUDA_CONTEXT) if args.gpu_gib else free_memory(args.device)[0]
    device = "cuda" if args.gpu_gib else args.device
    for line in p.lines() + method_needs.lines(rec.vlm, rec.reasoner, rec.base, device, free, "(on its own)"):
        print(line)
    return 0
