"""Streaming merge to disk: `python -m merging merge RECIPE OUT_DIR`.

Tensors are read lazily from the three checkpoints, merged on the device in recipe.dtype, cast
to the output dtype and written straight to their place in the output shards. Tensor-scope
methods hold one tensor of each model at a time; layer-scope methods one decoder block.

Which LM tensors are merged (the methods never decide this; inplace.py uses the same plan):
- decoder-layer tensors, limited to `layers: [start, end]` when given;
- the final norm (and any other non-layer, non-vocabulary LM tensor) only when no `layers`
  range is given: a range means "only these layers change";
- embed_tokens / lm_head only with `embeddings: merge_shared_rows` (whatever the range, since it
  is asked for explicitly): the first min(V_v, V_r, V_0) rows are merged, the others keep the
  VLM's. A vocabulary tensor absent from the reasoner or base (tied embeddings) keeps the VLM's.
Everything else (vision tower, projector, kept LM tensors) is copied bit for bit; `out_dtype`
applies to LM tensors only, so the vision tower and projector stay byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from merging import handoff, merge_report, methods, params
from merging import recipe as recipe_mod
from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.errors import Cancelled, LabError, WriteError
from merging.layout import ROLES, VOCAB_TENSORS, split_canonical
from merging.methods import MergeContext, TensorSet
from merging.output_folder import AtomicFolder
from merging.writer import ShardedWriter, copy_side_files, parse_size, side_files, write_text

MERGE_REPORT = "merge_report.json"  # what the merge changed (merging/merge_report.py), beside the weights
# Rows per block for elementwise methods: ~1 MB of float32 keeps a block's passes in cache on a
# CPU; on a GPU larger blocks amortise the copies and kernel launches.
BLOCK_ELEMS = 1 << 18
BLOCK_ELEMS_CUDA = 1 << 24


@dataclass
class Group:
    """Canonical names merged together: one tensor (tensor scope) or one block (layer scope)."""

    layer: int | None
    names: list[str]
    shared_rows: bool = False  # merge only the first min(V_v, V_r, V_0) rows


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LabError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LabError(f"device {device!r} requested but CUDA is not available; use --device cpu")


def plan_groups(recipe, method, layouts: dict) -> tuple[list[Group], list[str]]:
    """The merged groups in processing order, and notes for the model card."""
    v = layouts["vlm"]
    others = [layouts[r] for r in ("reasoner", "base") if r in layouts]
    notes: list[str] = []
    blocks: dict[int, list[str]] = {}
    singles: list[Group] = []
    for c in v.lm:
        layer, _ = split_canonical(c)
        if layer is not None:
            if recipe.layers is None or recipe.layers[0] <= layer <= recipe.layers[1]:
                blocks.setdefault(layer, []).append(c)
        elif c in VOCAB_TENSORS:
            if recipe.embeddings != "merge_shared_rows":
                continue
            if all(c in o.lm for o in others):
                singles.append(Group(None, [c], shared_rows=True))
            else:
                notes.append(f"{c} is absent in the reasoner or base (tied embeddings?): the VLM's is kept")
        elif recipe.layers is None:
            singles.append(Group(None, [c]))
    if method.scope == "layer":
        groups = [Group(i, names) for i, names in sorted(blocks.items())]
    else:
        groups = [Group(i, [c]) for i, names in sorted(blocks.items()) for c in names]
    return groups + singles, notes


def read_checked(ck, name: str, role: str, device: str, dtype: torch.dtype | None = None,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor (or rows start..stop-1 of it) from a checkpoint; NaN/Inf is an error naming the
    tensor and the model."""
    t = ck.get(name) if rows is None else ck.get_rows(name, *rows)
    if t.is_floating_point() and not _finite(t):
        raise LabError(f"tensor {name} of the {role} model ({ck.path}) contains NaN or Inf; refusing to merge it")
    if dtype is None:
        return t.to(device)
    return t.to(device=device, dtype=dtype)


def _finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN/Inf in t. A float32-accumulated sum is NaN/Inf exactly when an element is (weights
    never sum past 3e38): one vectorised pass, 3x faster than isfinite on bf16 (the check was the
    largest cost of a merge in the profile). Only a non-finite sum pays for the exact chunked check
    (chunked: on a whole embedding matrix isfinite's temporaries would exceed the tensor)."""
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def merge_group(method, group: Group, sets: dict[str, TensorSet], knobs: dict, ctx: MergeContext) -> dict:
    """Merged tensors (compute dtype) of one group; a name left out keeps the VLM's."""
    p = params.resolve(method, knobs, group.layer, ctx.num_layers)
    full = {}
    if group.shared_rows:
        full = {c: t.vlm for c, t in sets.items()}
        sets = {c: _rows(t) for c, t in sets.items()}
    if method.scope == "layer":
        out = method.merge_layer(group.layer, sets, p, ctx)
    else:
        out = {c: method.merge_tensor(t, p, ctx) for c, t in sets.items()}
    for c, part in list(out.items()):
        if c in full:
            whole = full[c].clone()
            whole[: part.shape[0]] = part
            out[c] = whole
    for c, t in sets.items():  # what the merge changed, for the merge report
        merge_report.record(ctx.extra, c, group.layer, out.get(c), full.get(c, t.vlm))
    return out


def merge_rows(method, group: Group, cks: dict, layouts: dict, knobs: dict, ctx: MergeContext,
               cdtype: torch.dtype, write, block_elems: int) -> None:
    """Stream one tensor of an elementwise method through it a block of rows at a time:
    read the rows of each model, merge, cast, write(start_row, rows). Equal to merge_group on the
    whole tensor, element for element; memory is a few blocks instead of several whole copies."""
    (c,) = group.names
    names = {r: layouts[r].lm[c] for r in ROLES if r in cks}
    shape = cks["vlm"].shape(names["vlm"])
    p = params.resolve(method, knobs, group.layer, ctx.num_layers)
    merged_rows = shared_rows(c, [cks[r].shape(n) for r, n in names.items()]) if group.shared_rows else shape[0]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, block_elems // per_row)
    start = 0
    while start < shape[0]:
        stop = min(start + step, merged_rows if start < merged_rows else shape[0])
        if start >= merged_rows:  # rows only the VLM has (shared_rows): its own bits
            write(start, read_checked(cks["vlm"], names["vlm"], "vlm", "cpu", rows=(start, stop)))
        else:
            parts = {r: cks[r].get_rows(n, start, stop).to(device=ctx.device, dtype=cdtype) for r, n in names.items()}
            out = method.merge_tensor(TensorSet(c, group.layer, parts["vlm"], parts.get("reasoner"),
                                                parts.get("base")), p, ctx)
            merge_report.record(ctx.extra, c, group.layer, out, parts["vlm"])
            # NaN/Inf in any input reaches an elementwise output (NaN * 0 is NaN), so one check of
            # the block, still in cache, replaces three; the inputs are only read again to name one.
            if out.is_floating_point() and not _finite(out):
                for r, n in names.items():
                    read_checked(cks[r], n, r, "cpu", rows=(start, stop))
                raise LabError(f"merging {c} overflowed to Inf (rows {start}-{stop - 1}); lower the knobs")
            write(start, out)
        start = stop


def shared_rows(name: str, shapes: list[tuple]) -> int:
    """min(V_v, V_r, V_0): the vocabulary rows all models have (shapes[0] is the VLM's)."""
    if any(tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes):
        raise LabError(f"{name}: hidden sizes differ between the models; cannot merge shared rows")
    return min(s[0] for s in shapes)


def _rows(t: TensorSet) -> TensorSet:
    n = shared_rows(t.name, [x.shape for x in (t.vlm, t.reasoner, t.base) if x is not None])
    cut = (lambda x: None if x is None else x[:n])  # noqa: E731
    return TensorSet(t.name, t.layer, cut(t.vlm), cut(t.reasoner), cut(t.base))


def out_dtype_of(recipe, vlm_ck, actual: str, is_lm: bool) -> torch.dtype:
    own = vlm_ck.dtype(actual)
    if recipe.out_dtype and is_lm and own.is_floating_point:
        return torch_dtype(recipe.out_dtype)
    return own


class Progress:
    """tqdm on the terminal and the progress(done, total, message) callback; checks cancel()."""

    def __init__(self, total: int, progress=None, cancel=None, bar: bool | None = None):
        self.total, self.done, self.cb, self.cancel = total, 0, progress, cancel
        show = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total, disable=not show, unit="tensor", desc="merging", file=sys.stderr)

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled")

    def step(self, n: int, message: str) -> None:
        self.done += n
        self.bar.update(n)
        if self.cb is not None:
            self.cb(self.done, self.total, message)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Run:
    """One merge_to_disk call's plan and open state, shared by its steps."""

    recipe: object
    method: object
    report: object
    groups: list[Group]
    notes: list[str]
    ctx: MergeContext
    device: str
    knobs: dict
    cdtype: torch.dtype
    cks: dict = None
    entries: list = None  # (actual name, shape, output dtype) of every VLM tensor, in file order
    dtypes: dict = None

    @property
    def layouts(self) -> dict:
        return self.report.layouts


def merge_to_disk(recipe, out_dir, device: str = "cpu", progress=None, max_shard_bytes: int = 2 * 10**9,
                  cancel=None, overwrite: bool = False, bar: bool | None = None,
                  block_elems: int | None = None, protect=()) -> Path:
    """Merge `recipe` into a new Hugging Face model folder OUT_DIR (atomic). Returns OUT_DIR.
    block_elems: elements per block when streaming an elementwise method (default per device).
    OUT_DIR may never be one of the three models (or hold one), nor hold a path in `protect`."""
    t0 = time.time()
    method = methods.get(recipe.method)
    folder = AtomicFolder(out_dir, overwrite, (recipe.vlm, recipe.reasoner, recipe.base, *protect))
    folder.check()  # before any work: a bad OUT_DIR fails at once
    run = _plan(recipe, method, device)
    block = block_elems or (BLOCK_ELEMS_CUDA if torch.device(device).type == "cuda" else BLOCK_ELEMS)
    with contextlib.ExitStack() as stack:
        run.cks = {r: stack.enter_context(Checkpoint.open(ref)) for r, ref in run.report.refs.items()}
        _plan_entries(run)
        side = side_files(run.cks["vlm"].path)  # refused here, before any weight is written
        bar = Progress(len(run.entries), progress, cancel, bar)
        try:
            with folder as tmp:
                _write_weights(run, tmp, max_shard_bytes, bar, block)
                _write_side(run, tmp, side, time.time() - t0)
        except WriteError as e:  # the temp folder is already gone (AtomicFolder)
            raise LabError(f"{e}; nothing was written") from None
        finally:
            bar.close()
    return folder.out


def _plan(recipe, method, device: str) -> _Run:
    """Check device and triple, and plan the merged groups; nothing is opened for reading weights."""
    check_device(device)
    report = check_triple(recipe.vlm, recipe.reasoner, recipe.base if method.needs_base else None)
    report.raise_if_incompatible()
    num_layers = report.layouts["vlm"].num_layers
    params.validate_lengths(recipe, num_layers)
    groups, notes = plan_groups(recipe, method, report.layouts)
    ctx = MergeContext(seed=recipe.seed, device=device, num_layers=num_layers)
    ctx.extra["fingerprints"] = report.fingerprints  # lets ip_merging file its decompositions for the analyses
    return _Run(recipe, method, report, groups, notes, ctx, device, recipe.knobs(), torch_dtype(recipe.dtype))


def _plan_entries(run: _Run) -> None:
    vck = run.cks["vlm"]
    lm_actual = set(run.layouts["vlm"].lm.values())
    run.entries = [(a, vck.shape(a), out_dtype_of(run.recipe, vck, a, a in lm_actual)) for a in vck.names()]
    run.dtypes = {a: d for a, _, d in run.entries}


def _write_weights(run: _Run, tmp: Path, max_shard_bytes: int, bar: Progress, block: int) -> None:
    """Every tensor of the output: the kept ones bit for bit (cast only for out_dtype on LM
    tensors), then each merged group."""
    vck, vlay = run.cks["vlm"], run.layouts["vlm"]
    writer = ShardedWriter(tmp, run.entries, max_shard_bytes)
    merged = {vlay.lm[c] for g in run.groups for c in g.names}
    try:
        for a in (a for a in vck.names() if a not in merged):
            bar.check()
            writer.write(a, read_checked(vck, a, "vlm", "cpu").to(run.dtypes[a]))
            bar.step(1, f"copy {a}")
        with one_thread(run.method.elementwise and torch.device(run.device).type == "cpu"):
            for g in run.groups:
                bar.check()
                if run.method.elementwise and len(vck.shape(vlay.lm[g.names[0]])) > 0:
                    _stream_group(run, g, writer, block)
                    bar.step(1, f"layer {g.layer}" if g.layer is not None else g.names[0])
                else:
                    _merge_whole_group(run, g, writer)
                    bar.step(len(g.names), f"layer {g.layer}" if g.layer is not None else g.names[0])
        writer.finish()  # closes the files, reporting any late write error
    except BaseException:
        writer.close_files()  # before AtomicFolder removes the folder
        raise


@contextlib.contextmanager
def one_thread(on: bool = True):
    """torch's CPU ops on one thread for the block (restored after).

    For streamed blocks: each op on a ~1 MB block takes ~0.1 ms, so a second thread gains nothing
    (measured), but every op's fork-join waits for both threads, and on a shared CPU the second is
    often descheduled for a whole time slice: on 2 cores shared with other work (load 2-4), a streamed
    task_arithmetic merge took 43 s on 2 threads and 5.6 s on one. Elementwise results do not
    depend on the thread count."""
    before = torch.get_num_threads()
    if not on or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stream_group(run: _Run, g: Group, writer, block: int) -> None:
    a = run.layouts["vlm"].lm[g.names[0]]
    merge_rows(run.method, g, run.cks, run.layouts, run.knobs, run.ctx, run.cdtype, block_elems=block, write=lambda s, t: writer.write_rows(a, s, t.to(run.dtypes[a])))


def _merge_whole_group(run: _Run, g: Group, writer) -> None:
    cks, layouts = run.cks, run.layouts
    sets = {c: TensorSet(c, g.layer, *(
        read_checked(cks[r], layouts[r].lm[c], r, run.device, run.cdtype) if r in cks else None
        for r in ROLES)) for c in g.names}
    out = merge_group(run.method, g, sets, run.knobs, run.ctx)
    del sets  # the inputs go before the outputs are cast and written
    for c in g.names:
        a = layouts["vlm"].lm[c]
        res = out.pop(c, None)
        if res is None:  # the method kept the VLM's: write its original bits
            res = read_checked(cks["vlm"], a, "vlm", "cpu")
        writer.write(a, res.to(run.dtypes[a]))


def _write_side(run: _Run, tmp: Path, side: list, seconds: float) -> None:
    copy_side_files(run.cks["vlm"].path, tmp, side)
    write_text(tmp / "recipe.yaml", run.recipe.to_yaml())
    report = merge_report.build(run.method.name, run.ctx.extra, [c for g in run.groups for c in g.names])
    write_text(tmp / MERGE_REPORT, json.dumps(report, indent=1) + "\n")
    write_text(tmp / "README.md", model_card(run.recipe, run.method, run.report,
                                             run.notes + merge_report.summary_lines(report), seconds))
    handoff.write_lmms_eval_task(tmp)  # what lmms-eval needs to score the folder (the card says how)


def model_card(recipe, method, report, notes: list[str], seconds: float) -> str:
    """README.md of the merged folder: Hugging Face front matter (the VLM and the reasoner as base
    models of a merge), sources, knobs and settings, the recipe in mergekit's format where mergekit
    has the method, and how to benchmark the folder with lmms-eval."""
    knobs = recipe.knobs()
    lines = [handoff.front_matter(report.refs, method.name), f"# Merged with `{method.name}`", "",
             f"{method.description}", "", "## Sources", "",
             "| role | model | fingerprint |", "|---|---|---|"]
    lines += [f"| {r} | `{report.refs[r]}` | `{report.fingerprints[r]}` |" for r in report.refs]
    lines += ["", "## Knobs", ""] + [f"- `{k}`: {v}" for k, v in knobs.items()]
    lines += ["", "## Settings", "",
              f"- layers: {list(recipe.layers) if recipe.layers else 'all'}",
              f"- embeddings: {recipe.embeddings}", f"- compute dtype: {recipe.dtype}",
              f"- output dtype: {recipe.out_dtype or 'the VLM own, per tensor'}", f"- seed: {recipe.seed}",
              f"- merge time: {seconds:.1f} s", "",
              "Only language-model weights changed; the vision tower and projector are the VLM's, bit for bit.",
              "The full recipe is in `recipe.yaml`."]
    lines += ["", *handoff.mergekit_section(recipe, knobs), "", *handoff.lmms_eval_section(report.layouts["vlm"].family)]
    warn = notes + report.warnings
    if warn:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in warn]
    return "\n".join(lines) + "\n"


def main_merge(args) -> int:
    rec = recipe_mod.load(args.recipe)
    size = parse_size(getattr(args, "max_shard_size", "2GB"))
    out = merge_to_disk(rec, args.out_dir, device=getattr(args, "device", "cpu"), max_shard_bytes=size,
                        overwrite=getattr(args, "overwrite", False), protect=(args.recipe,),
                        bar=False if getattr(args, "no_progress", False) else None)
    print(f"merged {rec.method} into {out}")
    report = json.loads((out / MERGE_REPORT).read_text())
    for line in merge_report.summary_lines(report):  # warnings last, each beginning "warning:"
        print(line)
    return 0
