"""A method and its knobs (a leaderboard row, a tuner's front point) put into the merge panel, as a
link with them would set it: scalars through url_state, per-layer schedules in the per-layer box."""

from __future__ import annotations

import gradio as gr
import yaml

from webapp.ui import url_state
from webapp.ui.merge_panel import MergePanel


def knobs_into_merge(merge: MergePanel, dims, method: str, knobs: dict, what: str, source: str,
                     load_status: gr.Markdown) -> dict:
    """The updates that show METHOD with KNOBS in the merge panel; WHAT names it in both status lines,
    SOURCE says where it came from. Knobs the current triple cannot take are fitted and warned about."""
    scalars = {k: str(v) for k, v in knobs.items() if not isinstance(v, list)}
    schedules = {k: v for k, v in knobs.items() if isinstance(v, list)}
    per_layer = {"per_layer": yaml.safe_dump(schedules, default_flow_style=None).strip()} if schedules else {}
    state, notes = url_state.parse({"method": method, **scalars, **per_layer})
    state, more = url_state.fit(state, dims)
    ups = merge.apply(state, dims)
    ups[merge.status] = f"Loaded **{what}** from the {source}: press **Merge**."
    warn = "".join(f"\n\n⚠ {n}" for n in notes + more)
    ups[load_status] = f"✓ {what} is set in **2 · Merge**; press **Merge** there to use it.{warn}"
    return ups
