"""What the two methods that learn or train hold beyond a merge, as the memory plan's last lines: FRISM's
gate learning with every layer gated (merging/gate_learning.py) and a DRIFT fine-tune
(merging/drift_memory.py), each against the memory left free, so a user sees before trying whether it fits.
"""

from __future__ import annotations

from merging import drift_memory, gate_memory
from merging.compat import check_triple

GiB = 2**30


def lines(vlm_ref: str, reasoner_ref: str, base_ref: str | None, device: str, free: int, where: str,
          released: int = 0) -> list[str]:
    """One line per method: what it holds on DEVICE and whether that fits in FREE bytes (WHERE says what
    FREE is: on its own in the CLI, or beside the served model in the app); frism's learning also has
    RELEASED, what the in-place merger lets go of while it learns."""
    report = check_triple(vlm_ref, reasoner_ref, base_ref)
    lm = report.layouts["vlm"].lm
    out = []
    if base_ref:  # frism needs the base
        need = gate_memory.holding_bytes(vlm_ref, lm, gate_memory.gated_matrices(vlm_ref, lm, lm), device)
        more = f" (+{released / GiB:.2f} GiB of input copies let go while it learns)" if released else ""
        out.append(_line("frism's gate learning, every layer gated", need, free + released, where + more))
    on_device, _ = drift_memory.drift_bytes(vlm_ref, reasoner_ref).on(device)
    out.append(_line("a DRIFT fine-tune", on_device, free, where))
    return out


def _line(what: str, need: int, free: int, where: str) -> str:
    verdict = "fits" if need <= drift_memory.HEADROOM * free else "does not fit"
    return f"{what}: {need / GiB:.2f} GiB before activations, {free / GiB:.2f} GiB free {where}: {verdict}"
