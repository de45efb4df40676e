"""One group of tensors through a method: read (checked for NaN/Inf), merge whole or streamed a
block of rows at a time, record what changed for the merge report. merge_to_disk and the
in-place merger both merge through here, so the two give the same tensors."""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from merging import merge_report, params
from merging.errors import Cancelled, LabError
from merging.layout import ROLES
from merging.merge_plan import Group
from merging.methods import MergeContext, TensorSet


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
        merge_report.record(ctx.diagnostics, c, group.layer, out.get(c), full.get(c, t.vlm))
    return out


def merge_rows(method, group: Group, cks: dict, layouts: dict, knobs: dict, ctx: MergeContext,
               cdtype: torch.dtype, write, block_elems: int) -> None:
    """Stream one tensor of an elementwise method through it a block of rows at a time:
    read the rows of each model, merge, cast, write(start_row, rows). Equal to merge_group on the
    whole tensor, element for element; memory is a few blocks instead of several whole copies."""
    (c,) = group.names
    names = {r: layouts[r].lm[c] for r in ROLES if r in cks}
    p = params.resolve(method, knobs, group.layer, ctx.num_layers)
    merged_rows, blocks = row_blocks(group, cks, names, block_elems)
    for start, stop in blocks:
        if start >= merged_rows:  # rows only the VLM has (shared_rows): its own bits
            write(start, read_checked(cks["vlm"], names["vlm"], "vlm", "cpu", rows=(start, stop)))
        else:
            out, change = merge_block(method, group, cks, names, p, ctx, cdtype, start, stop)
            ctx.diagnostics.add_change(c, group.layer, *change)
            write(start, out)


def row_blocks(group: Group, cks: dict, names: dict, block_elems: int) -> tuple[int, list[tuple[int, int]]]:
    """(rows merged, [(start, stop), ...]) of a streamed tensor: blocks of about block_elems
    elements, the last merged row ending a block (rows past it are only the VLM's)."""
    shape = cks["vlm"].shape(names["vlm"])
    merged_rows = (shared_rows(group.names[0], [cks[r].shape(n) for r, n in names.items()])
                   if group.shared_rows else shape[0])
    step = max(1, block_elems // max(1, math.prod(shape[1:])))
    blocks, start = [], 0
    while start < shape[0]:
        stop = min(start + step, merged_rows if start < merged_rows else shape[0])
        blocks.append((start, stop))
        start = stop
    return merged_rows, blocks


def merge_block(method, group: Group, cks: dict, names: dict, p: dict, ctx: MergeContext, cdtype: torch.dtype,
                start: int, stop: int, vlm: torch.Tensor | None = None,
                ref2: float | None = None) -> tuple[torch.Tensor, tuple[float, float]]:
    """Merged rows start..stop-1 of one tensor (compute dtype) and their change for the merge report
    (merge_report.change). vlm: the VLM's rows in the compute dtype when the caller has them (else
    read); ref2: their squared norm when known."""
    c = group.names[0]
    parts = {r: vlm if r == "vlm" and vlm is not None else
             cks[r].get_rows(n, start, stop).to(device=ctx.device, dtype=cdtype) for r, n in names.items()}
    out = method.merge_tensor(TensorSet(c, group.layer, parts["vlm"], parts.get("reasoner"), parts.get("base")),
                              p, ctx)
    change = merge_report.change(out, parts["vlm"], ref2)
    # NaN/Inf in any input reaches an elementwise output (NaN * 0 is NaN), so one check of
    # the block, still in cache, replaces three; the inputs are only read again to name one.
    # A finite ||out - vlm|| already says out is finite: only the rest pays for the exact check.
    suspect = out is parts["vlm"] or not math.isfinite(change[0])
    if out.is_floating_point() and suspect and not _finite(out):
        for r, n in names.items():
            read_checked(cks[r], n, r, "cpu", rows=(start, stop))
        raise LabError(f"merging {c} overflowed to Inf (rows {start}-{stop - 1}); lower the knobs")
    return out, change


def shared_rows(name: str, shapes: list[tuple]) -> int:
    """min(V_v, V_r, V_0): the vocabulary rows all models have (shapes[0] is the VLM's)."""
    if any(tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes):
        raise LabError(f"{name}: hidden sizes differ between the models; cannot merge shared rows")
    return min(s[0] for s in shapes)


def _rows(t: TensorSet) -> TensorSet:
    n = shared_rows(t.name, [x.shape for x in (t.vlm, t.reasoner, t.base) if x is not None])
    cut = (lambda x: None if x is None else x[:n])  # noqa: E731
    return TensorSet(t.name, t.layer, cut(t.vlm), cut(t.reasoner), cut(t.base))


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
