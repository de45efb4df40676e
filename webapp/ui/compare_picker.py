"""What this tab's merge is compared with, in the chat's right pane and Evaluate's second column (UI side).

The left side is always the tab's latest merge or DRIFT run ("A"). The right side is picked from the
original VLM and the merges and DRIFT runs this tab made before ("B"), so any two of {the VLM, merge A,
merge B, a DRIFT run} can be set side by side. The worker keeps up to four merged states, so answering
with B after A swaps the changed tensors instead of merging again (webapp.worker.panes).

State per tab: `made` (the variants made, newest first) and `other` (the picked one; None: the VLM). Every
panel's picker shows and sets the same `other`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from webapp.ui.lab import Lab, made_of
from webapp.ui.variants import VLM, name_of, variant_label

KEPT = 4  # merges offered: as many as the worker keeps merged at once, so a switch never re-merges


def remember(variant, made: list) -> list:
    """`made` with `variant` first (an earlier one of the same label dropped), at most KEPT long."""
    if not variant:
        return list(made or [])
    label = variant_label(variant)
    return [variant, *[v for v in made or [] if variant_label(v) != label]][:KEPT]


def choices(left, made: list) -> list[str]:
    """The right side's options: the VLM, then what this tab made before, except the left side itself."""
    here = variant_label(left) if left else None
    return [VLM, *[name_of(v) for v in made or [] if variant_label(v) != here]]


def pick(name: str | None, made: list):
    """The variant a picker entry names (None: the VLM, or an entry no longer offered)."""
    return next((v for v in made or [] if name_of(v) == name), None)


@dataclass
class Comparison:
    """One tab's comparison: the states, every picker built on them, and the components that show what
    was picked (each with its update function). Call wire() once all are built: each handler that sets
    `other` updates them too, in the same event (a State's own change event is not relied on)."""

    left: gr.State  # the tab's merge or DRIFT run (the merge panel's variant_state)
    made: gr.State
    other: gr.State
    pickers: list = field(default_factory=list)
    followers: list = field(default_factory=list)  # (component, fn(other) -> its update)

    def picker(self, elem_id: str, label: str = "compare with") -> gr.Dropdown:
        dd = gr.Dropdown([VLM], value=VLM, label=label, elem_id=elem_id, interactive=True, allow_custom_value=False,
                         info="the original VLM, or a merge or DRIFT run made earlier in this tab")
        self.pickers.append(dd)
        return dd

    def follow(self, component, fn) -> None:
        self.followers.append((component, fn))

    def _shown(self, other, options: list[str] | None = None) -> tuple:
        """(other, each picker's update, each follower's update)."""
        name = name_of(other)
        # a bare value when only the value changes: an update dict to a picker in a tab not opened yet was lost
        pickers = [name if options is None else gr.update(choices=options, value=name)]
        return (other, *pickers * len(self.pickers), *[fn(other) for _, fn in self.followers])

    def wire(self, lab: Lab, models) -> None:
        outs = [self.other, *self.pickers, *[c for c, _ in self.followers]]

        def on_left(left, made, other):
            made = remember(left, made)
            options = choices(left, made)
            return (made, *self._shown(other if name_of(other) in options else None, options))

        self.left.change(on_left, [self.left, self.made, self.other], [self.made, *outs], api_visibility="private",
                         queue=False)
        for dd in self.pickers:
            dd.input(lambda name, made: self._shown(pick(name, made)), [dd, self.made], outs,
                     api_visibility="private", queue=False)

        def on_triple(made, *triple):  # merges of another triple cannot be compared on this one
            if not made or made_of(lab, made[0], *triple):
                return (gr.skip(),) * (1 + len(outs))
            return ([], *self._shown(None, [VLM]))

        models.preset.input(on_triple, [self.made, *models.inputs], [self.made, *outs], api_visibility="private",
                            queue=False)


def build(variant_state: gr.State) -> Comparison:
    return Comparison(variant_state, gr.State([]), gr.State(None))
