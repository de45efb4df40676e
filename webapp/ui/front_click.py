"""A click on a point of a plot hands that point's label to a Python handler (UI side, in the browser).

Gradio 6's gr.Plot has no click or select event (its only event is change) and its plotly renderer
never listens to plotly_click, so a small page-level hook does: it binds plotly_click on the plot's
plotly div (bound again whenever the page changes: the div is redrawn, or mounted when its tab opens)
and writes the clicked point's label (customdata[at] of its trace) into a hidden textbox with a DOM
input event: the textbox's value changes, which fires its .change in Python. (Its .input would not:
Gradio's textbox sends input on a key press only.) The handler sets the box back to "" so a second
click on the same point loads it again. The label is only ever data: a value set on the textbox,
never run; the handler looks it up among the labels it made.
"""

from __future__ import annotations

import json

import gradio as gr

_HOOK = """() => {
  const plotSel = %(plot)s, boxSel = %(box)s, at = %(at)d, key = %(key)s;
  if (window[key]) return [];
  const send = (ev) => {
    const pt = ev && ev.points && ev.points[0];
    const label = pt && Array.isArray(pt.customdata) ? pt.customdata[at] : null;
    const box = document.querySelector(boxSel);
    if (typeof label !== "string" || !box) return;
    box.value = label;
    box.dispatchEvent(new Event("input", {bubbles: true}));
  };
  let queued = false;
  const bind = () => {
    queued = false;
    const gd = document.querySelector(plotSel);
    if (gd && typeof gd.on === "function") {
      gd.removeListener("plotly_click", send);
      gd.on("plotly_click", send);
    }
  };
  window[key] = new MutationObserver(() => {
    if (!queued) { queued = true; requestAnimationFrame(bind); }
  });
  window[key].observe(document.body, {childList: true, subtree: true});
  bind();
  return [];
}"""


def hook_js(plot_id: str, box_id: str, at: int) -> str:
    """The page-load handler that sends a click on #plot_id's points to #box_id (ids are ours, quoted)."""
    return _HOOK % {"plot": json.dumps(f"#{plot_id} .js-plotly-plot"), "box": json.dumps(f"#{box_id} textarea"),
                    "at": int(at), "key": json.dumps(f"labClick_{plot_id}")}


def box(elem_id: str) -> gr.Textbox:
    """The hidden textbox a click writes to: in the page (visible="hidden"), never shown."""
    return gr.Textbox("", visible="hidden", elem_id=elem_id, label="clicked point")


def wire(plot_id: str, target: gr.Textbox, at: int) -> None:
    """Install the hook when the page loads (gr.on with no trigger: on load; JS only, nothing runs in Python)."""
    gr.on(None, None, js=hook_js(plot_id, target.elem_id, at), queue=False, api_visibility="private")
