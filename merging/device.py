"""The compute device: a checked name, and torch's CPU threads for streamed work."""

from __future__ import annotations

import contextlib

import torch

from merging.errors import LabError

# Rows per block for elementwise methods: ~1 MB of float32 keeps a block's passes in cache on a
# CPU; on a GPU larger blocks amortise the copies and kernel launches.
BLOCK_ELEMS = 1 << 18
BLOCK_ELEMS_CUDA = 1 << 24


def block_elems(device: str) -> int:
    return BLOCK_ELEMS_CUDA if torch.device(device).type == "cuda" else BLOCK_ELEMS


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LabError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LabError(f"device {device!r} requested but CUDA is not available; use --device cpu")


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
