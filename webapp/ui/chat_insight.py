"""What the chat shows beside its answers (UI side, pure): the question check's warning in the panes,
and under them the last turn's key tokens for both panes, a compact table of the top-5 next-token
probabilities where the count, the operator, the result and the final answer were produced."""

from __future__ import annotations

import html

ROLES = ("count", "operator", "result", "answer")
PANES = (("merged", "merged model"), ("original", "original VLM"))


def warning_markdown(check: dict | None) -> str | None:
    """The pane's short warning before the answer: the words it cannot read and what to ask instead."""
    lines = (check or {}).get("lines") or []
    if not lines:
        return None
    short = [ln for ln in lines if not ln.startswith(("its ", "the pictures it knows"))]
    return "⚠️ " + "\n\n".join(short) + "\n\n_(what it understands: below the chat)_"


def _cell(row: dict | None) -> str:
    if not row:
        return "<td class='why-none'>–</td>"
    bars = "".join(
        f"<div class='why-cand{' why-chosen' if tok == row['token'] else ''}'>"
        f"<span class='why-tok'>{html.escape(tok)}</span>"
        f"<span class='why-bar' style='width:{max(1, round(60 * p))}px'></span>{p:.2f}</div>"
        for tok, p in row["top"])
    return f"<td>{bars}</td>"


def insight_html(turns: list[dict] | None) -> str:
    """The last turn's key-token table (and, for an unknown word or picture, the full check), or ''."""
    turn = (turns or [None])[-1]
    if not turn:
        return ""
    parts = []
    lines = (turn.get("check") or {}).get("lines") or []
    if lines:
        items = "".join(f"<li>{html.escape(ln)}</li>" for ln in lines)
        parts.append(f"<div class='why-warning'><b>⚠️ Before the answers: the question check</b><ul>{items}</ul></div>")
    keys = turn.get("keys") or {}
    shown = [(s, _column(s, label, turn)) for s, label in PANES if keys.get(s)]
    roles = [r for r in ROLES if any(row["role"] == r for s, _ in shown for row in keys[s])]
    if shown and roles:
        head = "".join(f"<th>{html.escape(label)}</th>" for _, label in shown)
        body = ""
        for role in roles:
            cells = "".join(_cell(next((row for row in keys[s] if row["role"] == role), None)) for s, _ in shown)
            body += f"<tr><th>{role}</th>{cells}</tr>"
        parts.append("<div class='why-keys'><b>Why this answer: the top-5 next tokens where each key token was "
                     "produced</b> (the one chosen in bold; from the same forward passes that generated it)"
                     f"<table><tr><th></th>{head}</tr>{body}</table></div>")
    return "".join(parts)


CSS = """<style>
#chat-why table { border-collapse: collapse; font-size: 0.85em; margin-top: 4px; }
#chat-why th, #chat-why td { border: 1px solid #ddd; padding: 2px 6px; vertical-align: top; text-align: left; }
#chat-why .why-cand { display: flex; align-items: center; gap: 4px; white-space: nowrap; }
#chat-why .why-tok { display: inline-block; min-width: 3.5em; font-family: monospace; }
#chat-why .why-bar { display: inline-block; height: 8px; background: #4c78a8; }
#chat-why .why-chosen { font-weight: bold; }
#chat-why .why-warning { background: #fff4e5; border: 1px solid #f0b429; padding: 4px 8px; margin-bottom: 6px; }
#chat-why .why-warning ul { margin: 2px 0 0 1.2em; }
</style>"""


def _column(stream: str, label: str, turn: dict) -> str:
    """A pane's column title, naming what answered there (the right pane may hold another merge)."""
    by = turn.get(f"{stream}_by")
    if stream == "merged":
        return f"{label} ({by})" if by else label
    return label if not by or by == "the original VLM" else f"compared: {by}"


def insight_view(turns: list[dict] | None) -> str:
    """The HTML block's value: its style and the last turn's insight."""
    return CSS + insight_html(turns)
