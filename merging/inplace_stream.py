"""The in-place merger's streamed elementwise merge on a CPU: one tensor's row blocks merged on
torch's threads side by side, straight into the tensor the parameter will hold.

Each block runs whole on one thread (torch's ops single-threaded inside): no fork-join per op, so a
core taken by another process slows only the blocks its thread holds while the other thread takes
the rest (per-op parallelism on 2 shared cores made a streamed merge several times slower:
merging.device.one_thread). The blocks, their merge and the merge report's sums are those of
merging.tensor_merge.merge_rows, the sums added in block order, so the tensors equal the folder
`python -m merging merge` writes, bit for bit, and the report equals its report.

The tensors written into are a dropped merge's when there is one (Spares): a new tensor takes a
page fault per 4 KiB page on its first write (at the Qwen2-0.5B shape, writing the rows took 0.80 s
of a 3.73 s re-merge into new tensors, 0.26 s into a dropped merge's; BENCHMARKS.md).

Remembered between merges (StreamMemo): whether a tensor's loaded original has the bits of its
checkpoint's rows in the compute dtype (checked block by block on its first merge; from then on
its rows come from memory, not from the file), and the squared norm of each block of the VLM.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field

import torch

from merging import params
from merging.device import BLOCK_ELEMS
from merging.layout import ROLES
from merging.merge_plan import Group
from merging.methods import MergeContext
from merging.tensor_merge import merge_block, read_checked, row_blocks


@dataclass
class StreamMemo:
    exact: dict = field(default_factory=dict)  # (canonical, cdtype) -> the loaded original has the file's bits
    ref2: dict = field(default_factory=dict)  # (canonical, start, stop, cdtype) -> ||VLM rows||^2


class Spares:
    """Tensors of a merge the in-place merger dropped, by canonical name, for the next merge to write
    into instead of new ones; held only during that merge."""

    def __init__(self):
        self._by_name: dict[str, torch.Tensor] = {}
        self._ptrs: set[int] = set()

    def add(self, c: str, t: torch.Tensor, like: torch.Tensor, original: torch.Tensor) -> None:
        """Keep t for parameter `like` (name c): only a tensor of the merge's own, never the original
        (a tied parameter's second name may already show it again), and each tensor once."""
        ptr = t.data_ptr()
        if (c not in self._by_name and ptr not in self._ptrs and ptr != original.data_ptr()
                and (t.shape, t.dtype, t.device) == (like.shape, like.dtype, like.device)):
            self._by_name[c] = t
            self._ptrs.add(ptr)

    def take(self, c: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor like `like` for the merge of c: a dropped merge's, or a new one."""
        t = self._by_name.pop(c, None)
        return torch.empty_like(like) if t is None else t

    def clear(self) -> None:
        self._by_name.clear()
        self._ptrs.clear()


@dataclass
class _Job:
    """One tensor's stream: what every block needs."""

    method: object
    group: Group
    cks: dict
    names: dict
    p: dict
    ctx: MergeContext
    cdtype: torch.dtype
    target: torch.Tensor  # written rows start..stop-1 by the block that merged them
    dtype: torch.dtype  # the merge's output dtype (the values are rounded to it, as in the folder)
    live: torch.Tensor | None  # the loaded original, when it may stand for the file's rows
    verified: bool  # live is known to have the file's bits
    merged_rows: int
    same: bool = True  # no block found live differing from the file (first merge)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal calls -0.0 and 0.0 equal, and a merge may keep the sign)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class RowStreamer:
    """with RowStreamer(threads, memo) as s: s.merge(...) for each streamed tensor of a merge."""

    def __init__(self, threads: int, memo: StreamMemo, block_elems: int = BLOCK_ELEMS):
        self.threads, self.memo, self.block_elems = max(1, threads), memo, block_elems
        # the calling thread is one of the workers
        self.pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def __enter__(self) -> RowStreamer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def merge(self, method, group: Group, cks: dict, layouts: dict, knobs: dict, ctx: MergeContext,
              cdtype: torch.dtype, target: torch.Tensor, dtype: torch.dtype, live: torch.Tensor | None) -> None:
        """Merge the group's one tensor into `target` (its shape). cks: role -> open Checkpoint;
        live: the VLM's loaded original of the tensor, or None (then its rows are read)."""
        c = group.names[0]
        names = {r: layouts[r].lm[c] for r in ROLES if r in cks}
        merged_rows, blocks = row_blocks(group, cks, names, self.block_elems)
        exact = self.memo.exact.get((c, cdtype))
        job = _Job(method, group, cks, names, params.resolve(method, knobs, group.layer, ctx.num_layers), ctx,
                   cdtype, target, dtype, None if exact is False else live, bool(exact), merged_rows)
        changes = self._run(job, blocks)
        if job.live is not None and not job.verified:
            self.memo.exact[(c, cdtype)] = job.same
        for change in changes:  # in block order: the same sums as merge_rows
            if change is not None:
                ctx.diagnostics.add_change(c, group.layer, *change)

    def _run(self, job: _Job, blocks: list[tuple[int, int]]) -> list:
        """Every block's change, the blocks taken in order by whichever thread is free. Returns only
        once no thread writes any more (a restore after an error must not race a late block)."""
        results: list = [None] * len(blocks)
        errors: dict[int, BaseException] = {}
        order, lock, halt = iter(range(len(blocks))), threading.Lock(), threading.Event()

        def work():
            while not errors and not halt.is_set():
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                try:
                    results[i] = self._block(job, *blocks[i])
                except BaseException as e:  # noqa: BLE001 - raised below, the first block's first
                    errors[i] = e
                    return

        helpers = min(self.threads, len(blocks)) - 1
        futures = [self.pool.submit(work) for _ in range(helpers)] if self.pool is not None else []
        try:
            work()
        finally:
            halt.set()
            wait_all(futures)
        if errors:  # every block before the first failing one was taken, so it ran: as merge_rows would
            raise errors[min(errors)]
        return results

    def _block(self, job: _Job, start: int, stop: int) -> tuple[float, float] | None:
        if start >= job.merged_rows:  # rows only the VLM has (shared_rows): its own bits
            job.target[start:stop].copy_(read_checked(job.cks["vlm"], job.names["vlm"], "vlm", "cpu",
                                                      rows=(start, stop)).to(job.dtype))
            return None
        key = (job.group.names[0], start, stop, job.cdtype)
        out, change = merge_block(job.method, job.group, job.cks, job.names, job.p, job.ctx, job.cdtype,
                                  start, stop, self._vlm_rows(job, start, stop), self.memo.ref2.get(key))
        self.memo.ref2[key] = change[1]
        job.target[start:stop].copy_(out.to(job.dtype))
        return change

    def _vlm_rows(self, job: _Job, start: int, stop: int) -> torch.Tensor | None:
        """The VLM's rows in the compute dtype from memory once the original is known to have the
        file's bits; on the first merge they are read and compared. None: merge_block reads them."""
        if job.live is None:
            return None
        rows = job.live[start:stop].to(device=job.ctx.device, dtype=job.cdtype)
        if job.verified:
            return rows
        read = job.cks["vlm"].get_rows(job.names["vlm"], start, stop).to(device=job.ctx.device, dtype=job.cdtype)
        if not _same_bits(read, rows):
            job.same = False
        return read
