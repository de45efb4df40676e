"""Which parameter of a loaded model holds each canonical LM tensor (merging.layout's names)."""

from __future__ import annotations

from merging.errors import LabError


def _qualified_name(model, module) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def map_parameters(model, shapes: dict[str, tuple]) -> dict[str, str]:
    """canonical LM name -> the loaded model's parameter name.

    Derived, not hard-coded per family: the decoder module (get_decoder()) gives the prefix of
    layers/norm/embeddings and get_output_embeddings() the lm_head; when that fails, a unique
    parameter whose name ends with ".{canonical}" and whose shape matches is taken.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    get_dec = getattr(model, "get_decoder", None)
    dec = _qualified_name(model, get_dec()) if callable(get_dec) else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = _qualified_name(model, get_head()) if callable(get_head) else None
    out = {}
    for c, shape in shapes.items():
        guess = (f"{head}.weight" if head is not None else None) if c == "lm_head.weight" else (
            f"{dec}.{c}" if dec else c)
        if guess in named and tuple(named[guess].shape) == tuple(shape):
            out[c] = guess
            continue
        cands = [n for n, p in named.items() if (n == c or n.endswith("." + c)) and tuple(p.shape) == tuple(shape)]
        if dec:
            cands = [n for n in cands if n.startswith(dec + ".")] or cands
        if len(cands) != 1:
            raise LabError(f"cannot find the loaded model's parameter for {c} {tuple(shape)}: "
                           f"{len(cands)} candidates{' (' + ', '.join(cands[:3]) + ')' if cands else ''}")
        out[c] = cands[0]
    return out
