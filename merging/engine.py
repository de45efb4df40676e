"""Streaming merge to disk: `python -m merging merge RECIPE OUT_DIR`.

Tensors are read lazily from the three checkpoints, merged on the device in recipe.dtype, cast
to the output dtype and written straight to their place in the output shards. Tensor-scope
methods hold one tensor of each model at a time; layer-scope methods one decoder block.

Which LM tensors are merged: merging/merge_plan.py (the in-place merger uses the same plan); each
group goes through merging/tensor_merge.py; the folder's README: merging/model_card.py.
Everything else (vision tower, projector, kept LM tensors) is copied bit for bit; `out_dtype`
applies to LM tensors only, so the vision tower and projector stay byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging import device as device_mod
from merging import handoff, merge_report, methods, params
from merging import recipe as recipe_mod
from merging.checkpoint import Checkpoint
from merging.compat import CompatReport, check_triple
from merging.device import check_device, one_thread
from merging.errors import LabError, WriteError
from merging.layout import ROLES
from merging.merge_plan import Group, out_dtype_of, plan_groups, torch_dtype
from merging.methods import MergeContext, MergeMethod, TensorSet
from merging.model_card import model_card
from merging.output_folder import AtomicFolder
from merging.recipe import Recipe
from merging.tensor_merge import Progress, merge_group, merge_rows, read_checked
from merging.writer import ShardedWriter, copy_side_files, parse_size, side_files, write_text

MERGE_REPORT = "merge_report.json"  # what the merge changed (merging/merge_report.py), beside the weights


@dataclass
class _Run:
    """One merge_to_disk call's plan and open state, shared by its steps."""

    recipe: Recipe
    method: MergeMethod
    report: CompatReport
    groups: list[Group]
    notes: list[str]
    ctx: MergeContext
    device: str
    knobs: dict
    cdtype: torch.dtype
    cks: dict[str, Checkpoint] = field(default_factory=dict)  # role -> open checkpoint
    # (actual name, shape, output dtype) of every VLM tensor, in file order
    entries: list[tuple[str, tuple, torch.dtype]] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

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
    method.prepare(recipe, run.ctx, progress, cancel)  # before the output folder: a cancel leaves nothing
    block = block_elems or device_mod.block_elems(device)
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
    # the fingerprints let ip_merging file its decompositions for the analyses
    ctx = MergeContext(seed=recipe.seed, device=device, num_layers=num_layers, fingerprints=report.fingerprints)
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
    report = merge_report.build(run.method.name, run.ctx.diagnostics, [c for g in run.groups for c in g.names],
                                run.recipe.knobs())
    write_text(tmp / MERGE_REPORT, json.dumps(report, indent=1) + "\n")
    write_text(tmp / "README.md", model_card(run.recipe, run.method, run.report,
                                             run.notes + merge_report.summary_lines(report), seconds))
    handoff.write_lmms_eval_task(tmp)  # what lmms-eval needs to score the folder (the card says how)


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
