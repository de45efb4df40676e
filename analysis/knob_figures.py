"""The figures of a sweep and of a tune (plotly only: the UI process draws them from the worker's results).

A sweep: accuracy against the knob's value per suite, its 95% Wilson interval as a band. A tune:
dev perception vs visual_math of every trial, the Pareto front with 95% intervals, the chosen point
and the VLM, over the leaderboard's held-out points when given.
"""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go

SUITES = ("perception", "visual_math", "text_math")  # analysis.evaluate's, without importing torch here
PERCEPTION_SLACK = 0.03  # analysis.leaderboard's free-lunch bound (tests check they agree)
COLOURS = {"perception": "#1f77b4", "visual_math": "#d62728", "text_math": "#2ca02c"}


def sweep_figure(result: dict) -> go.Figure:
    """Accuracy against the knob's value per suite, its 95% Wilson interval as a band."""
    knob, pts = result["knob"], sorted(result["points"], key=lambda p: p["value"])
    fig = go.Figure()
    xs = [p["value"] for p in pts]
    for s in [s for s in SUITES if pts and s in pts[0]]:
        c = COLOURS[s]
        lo, hi = [100 * p[s]["lo"] for p in pts], [100 * p[s]["hi"] for p in pts]
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", mode="lines", line={"width": 0},
                                 fillcolor=_alpha(c), hoverinfo="skip", showlegend=False, name=f"{s} 95%"))
        fig.add_trace(go.Scatter(
            x=xs, y=[100 * p[s]["acc"] for p in pts], mode="lines+markers", name=s, line={"color": c},
            customdata=[[p[s]["k"], p[s]["n"], 100 * p[s]["lo"], 100 * p[s]["hi"]] for p in pts],
            hovertemplate=f"{s}<br>{knob} %{{x}}: %{{y:.1f}}% (%{{customdata[0]}}/%{{customdata[1]}})"
                          "<br>95%: %{customdata[2]:.1f} to %{customdata[3]:.1f}<extra></extra>"))
    fig.update_layout(title={"text": f"{result['method']}: accuracy against {knob}<br><sup>bands: 95% Wilson "
                             f"intervals, {result.get('limit') or 'all'} items per suite</sup>"},
                      xaxis={"title": knob}, yaxis={"title": "accuracy (%)", "range": [-2, 102]},
                      template="plotly_white", height=460, margin={"t": 70},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def _alpha(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},0.15)"


def write_plots(fig: go.Figure, folder: Path, stem: str) -> list[str]:
    """stem.html always (plotly.js inlined: works offline); stem.png too where kaleido is installed."""
    fig.write_html(folder / f"{stem}.html", include_plotlyjs=True)
    written = [f"{stem}.html"]
    try:
        fig.write_image(folder / f"{stem}.png")
        written.append(f"{stem}.png")
    except (ImportError, ValueError, RuntimeError):
        pass  # no kaleido (or no browser for it): the HTML is the plot
    return written


FRONT_LABEL_AT = 1  # a front point's customdata: [its knobs as JSON, its front_label] (the app's click reads it)


def front_label(result: dict, point: dict) -> str:
    """A front point as the app lists it (and its hover names it): trial, knobs, dev accuracies, chosen."""
    acc = "  ".join(f"{s} {100 * point['dev'][s]['acc']:.0f}" for s in ("perception", "visual_math"))
    star = " ★ chosen" if point["trial"] == result["best"]["trial"] else ""
    return f"trial {point['trial']}: {describe(point['knobs'])} (dev {acc}){star}"


def tune_figure(result: dict, board: dict | None = None, in_app: bool = False) -> go.Figure:
    """Dev perception vs visual_math of every trial (grey), the front (with 95% intervals), the chosen
    point and the VLM; the leaderboard's held-out points when `board` (its result) is given. in_app:
    a front point's hover says how the app loads it (a click, or its entry in the list below)."""
    fig = go.Figure()
    hover = "%{hovertext}" + ("<br><i>click to load it into 2 · Merge (or pick it in “a point of the front” "
                              "below)</i>" if in_app else "") + "<extra></extra>"
    pct = [100 * result["vlm_dev"]["perception"]["acc"] - 100 * PERCEPTION_SLACK]
    fig.add_vline(x=pct[0], line={"dash": "dot", "color": "#2a7a40"},
                  annotation_text="VLM perception - 3 (dev)", annotation_position="top left")
    f = result["front"]
    # the front's own trials are drawn by the front only: under it, a grey copy would take their hover
    trials = [t for t in result.get("trials_dev", []) if t["trial"] not in {p["trial"] for p in f}]
    fig.add_trace(go.Scatter(x=[100 * t["dev"]["perception"]["acc"] for t in trials],
                             y=[100 * t["dev"]["visual_math"]["acc"] for t in trials], mode="markers",
                             name="other trials (dev)", marker={"color": "#bbbbbb", "size": 7},
                             hovertext=[describe(t["knobs"]) for t in trials]))
    fig.add_trace(go.Scatter(
        x=[100 * p["dev"]["perception"]["acc"] for p in f], y=[100 * p["dev"]["visual_math"]["acc"] for p in f],
        mode="lines+markers", name="Pareto front (dev)", line={"color": "#d62728", "shape": "hv"},
        error_x=_err(f, "perception"), error_y=_err(f, "visual_math"), marker={"size": 10},
        customdata=[[json.dumps(p["knobs"]), front_label(result, p)] for p in f],
        hovertext=[front_label(result, p) for p in f],
        hovertemplate=hover))
    b = result["best"]
    fig.add_trace(go.Scatter(x=[100 * b["dev"]["perception"]["acc"]], y=[100 * b["dev"]["visual_math"]["acc"]],
                             mode="markers", name="chosen (dev)",
                             customdata=[[json.dumps(b["knobs"]), front_label(result, b)]],
                             marker={"symbol": "star", "size": 16, "color": "#d62728"},
                             hovertext=[front_label(result, b)], hovertemplate=hover))
    v = result["vlm_dev"]
    fig.add_trace(go.Scatter(x=[100 * v["perception"]["acc"]], y=[100 * v["visual_math"]["acc"]], mode="markers",
                             name="the VLM (dev)", marker={"symbol": "star-open", "size": 16, "color": "#333"}))
    if board is not None:
        for e in board.get("entries", []):
            if "perception" in e.get("test", {}):
                fig.add_trace(go.Scatter(x=[100 * e["test"]["perception"]], y=[100 * e["test"]["visual_math"]],
                                         mode="markers", name=f"{e['method']} ({e['label']}, held-out)",
                                         marker={"symbol": "diamond-open", "size": 9}, visible="legendonly"
                                         if e["method"] != result["method"] else True))
    load = "; click a front point to load it into the merge panel" if in_app else ""
    fig.update_layout(title={"text": f"{result['method']}: {result['trials']} trials on dev<br><sup>error bars: "
                             f"95% Wilson intervals{load}</sup>"},
                      xaxis={"title": "perception accuracy (%)"}, yaxis={"title": "visual_math accuracy (%)"},
                      template="plotly_white", margin={"t": 70, "b": 60},
                      # the leaderboard's rows can add 20 entries: on the right, in their own column, the plot
                      # keeps its size and the axis title stays clear of them
                      height=max(520, 120 + 19 * len(fig.data)), legend={"x": 1.02, "y": 1, "yanchor": "top",
                                                                        "font": {"size": 11}})
    return fig


def _err(points: list[dict], suite: str) -> dict:
    acc = [p["dev"][suite] for p in points]
    return {"type": "data", "symmetric": False, "array": [100 * (a["hi"] - a["acc"]) for a in acc],
            "arrayminus": [100 * (a["acc"] - a["lo"]) for a in acc], "thickness": 1, "width": 0,
            "color": "rgba(214,39,40,0.3)"}


def describe(knobs: dict) -> str:
    """"alpha 0.8 -> 1.1, density 0.6" (a schedule as start -> end)."""
    parts = []
    for k, v in knobs.items():
        parts.append(f"{k} {v[0]:g} -> {v[-1]:g}" if isinstance(v, list) else f"{k} {v:g}")
    return ", ".join(parts) or "defaults"


