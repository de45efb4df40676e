"""Every plot of the built page downloads as PNG and SVG: two toolbar buttons per gr.Plot, each a
client-side handler (no server call) that has plotly.js write that plot in its format. (The
download itself, in a real browser: tests/test_app_sweep_browser.py.)"""

from __future__ import annotations

from webapp.ui import page
from webapp.ui.client import WorkerClient
from webapp.ui.lab import Lab


def test_every_plot_on_the_page_has_png_and_svg_downloads(tmp_path):
    config = page.build(Lab(WorkerClient({}), tmp_path)).get_config_file()  # the worker is never started
    clicks = {d["targets"][0][0]: d for d in config["dependencies"] if d["targets"] and d["targets"][0][1] == "click"}
    plots = [c for c in config["components"] if c["type"] == "plot"]
    assert len(plots) >= 6  # the merge's change, each analysis figure, the leaderboard, sweep and tune
    for p in plots:
        elem_id = p["props"]["elem_id"]
        buttons = p["props"]["buttons"]
        assert [b["value"] for b in buttons] == ["PNG", "SVG"], elem_id
        for b, fmt in zip(buttons, ("png", "svg")):
            dep = clicks[b["id"]]
            assert dep["backend_fn"] is False and dep["api_visibility"] == "private", elem_id
            js = dep["js"]
            assert f'"#{elem_id} .js-plotly-plot"' in js and f'"format": "{fmt}"' in js and "downloadImage" in js
            assert f'"filename": "{elem_id}"' in js
