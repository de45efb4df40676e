"""Every plot of the app downloads as PNG and SVG (UI side): `plot_export.plot(...)` is gr.Plot with two
buttons in its toolbar that have plotly.js write the figure as drawn, in the browser.

Why in the browser: Gradio sends a plotly figure as Figure.to_json() (data and layout: a figure's
config, the one place a second modebar image button could be set, never reaches plotly.js), and
server-side images need kaleido, which is not installed here. Plotly.downloadImage needs neither and
keeps what the user sees (legend toggles, zoom). The modebar's camera button (PNG) stays too.
"""

from __future__ import annotations

import json

import gradio as gr

FORMATS = ("png", "svg")
PNG_SCALE = 2  # twice the drawn size: sharp in a slide or a paper


def download_js(elem_id: str, fmt: str) -> str:
    """The button's client-side handler: the plot under #elem_id written as elem_id.fmt (nothing when
    the plot is still empty)."""
    opts = {"format": fmt, "filename": elem_id, **({"scale": PNG_SCALE} if fmt == "png" else {})}
    selector = json.dumps(f"#{elem_id} .js-plotly-plot")
    return (f"() => {{ const gd = document.querySelector({selector}); "
            f"if (gd && window.Plotly) window.Plotly.downloadImage(gd, {json.dumps(opts)}); return []; }}")


def plot(value=None, *, elem_id: str, **kwargs) -> gr.Plot:
    """gr.Plot(value, elem_id=..., **kwargs) with a PNG and an SVG download button in its toolbar."""
    buttons = [gr.Button(fmt.upper(), size="sm") for fmt in FORMATS]
    out = gr.Plot(value, elem_id=elem_id, buttons=buttons, **kwargs)
    for button, fmt in zip(buttons, FORMATS):
        button.click(None, js=download_js(elem_id, fmt), queue=False, api_visibility="private")
    return out
