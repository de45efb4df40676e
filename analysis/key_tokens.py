"""Why an answer came out as it did: the next-token probabilities where its key tokens were produced.

An answer in the lab's format ("there are 5 circles . 5 + 3 = 8 . the answer is 8 .") has four
places that decide it: the count (the first number), the operator (the first of + - < > after it),
the result (the number after "=") and the final answer (the word after "answer is"). At each, the
top candidates with their probabilities show whether a merge miscounted (the count's distribution)
or chose the wrong operation (the operator's). The logits are the ones generate computed for each
new token (no extra forward pass), softmaxed at temperature 1 before any sampling processor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

TOP_K = 5
# (role, pattern whose group 1 starts at the key token); searched in order, each after the previous one found
KEYS = (("count", re.compile(r"(\d+)")), ("operator", re.compile(r"\d+\s*([+\-<>])")),
        ("result", re.compile(r"=\s*(\d+)")), ("answer", re.compile(r"answer is\s+(\w+)", re.IGNORECASE)))


def token_spans(tok, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(the decoded text, the character offset where each token's text ends in it)."""
    ends = [len(tok.decode(list(ids[: i + 1]), skip_special_tokens=True)) for i in range(len(ids))]
    return tok.decode(list(ids), skip_special_tokens=True), ends


def key_positions(tok, ids: Sequence[int]) -> list[tuple[str, int]]:
    """(role, index into ids) of each key token the answer has, in the order they were generated."""
    text, ends = token_spans(tok, ids)
    out, start = [], 0
    for role, pattern in KEYS:
        m = pattern.search(text, start if role != "answer" else 0)
        if not m:
            continue
        char = m.start(1)
        index = next(i for i, e in enumerate(ends) if e > char)
        out.append((role, index))
        start = m.end(1) if role != "answer" else start
    return out


def _label(tok, token_id: int) -> str:
    text = tok.decode([token_id])
    return text.strip() or repr(text)


def key_tokens(tok, ids: Sequence[int], logits: Sequence[torch.Tensor], k: int = TOP_K) -> list[dict]:
    """For each key token: {"role", "position", "token", "prob", "top": [[token, prob], ...]} where
    logits[i] (the scores generate computed before token i, any shape with the vocabulary last) gives
    the distribution token i was drawn from."""
    rows = []
    for role, i in key_positions(tok, ids):
        if i >= len(logits):
            continue
        probs = torch.softmax(logits[i].detach().float().reshape(-1), dim=0)
        top = torch.topk(probs, min(k, probs.numel()))
        rows.append({"role": role, "position": i, "token": _label(tok, int(ids[i])),
                     "prob": float(probs[int(ids[i])]),
                     "top": [[_label(tok, int(t)), float(p)] for p, t in zip(top.values, top.indices)]})
    return rows
