"""One plotly Figure per analysis, built from the plain-data results (cached or fresh).

Every figure has a title that says what to look for, labelled axes and hover text that reads
as a sentence ("layer 3, mlp.up_proj: cos = 0.02"), so a student can use it without the papers.
"""

from __future__ import annotations

import math
import textwrap

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis import chance_cosine
from merging import merge_report

VLM_COLOUR, REASONER_COLOUR = "#1f77b4", "#ff7f0e"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
SUITE_COLOURS = {"perception": "#2ca02c", "visual_math": "#d62728", "text_math": "#9467bd"}
# An explicit height: a figure without one takes its container's, which is a sliver when the plot mounts in
# a tab not yet shown (Gradio draws it there at 30-120 px)
FIGURE_HEIGHT = 480


def _nan(v):
    return float("nan") if v is None else v


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _heatmap(z, modules, text, colorscale, zmin=None, zmax=None, zmid=None, colorbar=None):
    return go.Heatmap(
        z=[[_nan(v) for v in row] for row in z], x=modules, y=[f"layer {i}" for i in range(len(z))],
        text=text, hovertemplate="%{text}<extra></extra>", colorscale=colorscale, zmin=zmin, zmax=zmax,
        zmid=zmid, colorbar=colorbar or {}, hoverongaps=False,
    )


def _hover_grid(z, modules, label) -> list[list[str]]:
    return [[f"layer {i}, {m}: {label} = {_fmt(v)}" for m, v in zip(modules, row)] for i, row in enumerate(z)]


# --------------------------------------------------------------------------------------- spectra
def spectra_figure(spectra: dict) -> go.Figure:
    """Singular values of tau_v (VLM) and tau_r (reasoner): slider = layer, dropdown = module."""
    modules, n = spectra["modules"], spectra["num_layers"]
    by = {(e["layer"], e["module"]): e for e in spectra["entries"]}
    fig = go.Figure()
    roles = (("VLM  (τ_v = W_v − W_0)", "s_v", VLM_COLOUR, "solid"),
             ("reasoner  (τ_r = W_r − W_0)", "s_r", REASONER_COLOUR, "dash"))

    def data(layer):
        xs, ys, hovers = [], [], []
        for m in modules:
            for label, key, _, _ in roles:
                e = by.get((layer, m))
                s = e[key] if e else []
                xs.append(list(range(1, len(s) + 1)))
                ys.append(s)
                hovers.append(f"layer {layer}, {m}, {label.split()[0]}: σ_%{{x}} = %{{y:.4g}}<extra></extra>")
        return xs, ys, hovers

    xs, ys, hovers = data(0)
    i = 0
    for j, m in enumerate(modules):
        for label, _, colour, dash in roles:
            fig.add_trace(go.Scatter(x=xs[i], y=ys[i], mode="lines", name=f"{label.split()[0]} {m}",
                                     line={"color": colour, "dash": dash}, hovertemplate=hovers[i],
                                     legendgroup=label, visible=(j == 0)))
            i += 1
    steps = []
    for layer in range(n):
        x, y, h = data(layer)
        steps.append({"label": str(layer), "method": "restyle", "args": [{"x": x, "y": y, "hovertemplate": h}]})
    n_tr = len(modules) * 2
    buttons = [{"label": m, "method": "restyle",
                "args": [{"visible": [k // 2 == j for k in range(n_tr)]}]} for j, m in enumerate(modules)]
    role_colours = [colour for _ in modules for _, _, colour, _ in roles]
    module_colours = [PALETTE[k // 2 % len(PALETTE)] for k in range(n_tr)]
    for b in buttons:
        b["args"][0]["line.color"] = role_colours
    # all modules at once: one colour per module (solid VLM, dashed reasoner), not 14 lines in two colours
    buttons.append({"label": "all modules", "method": "restyle",
                    "args": [{"visible": [True] * n_tr, "line.color": module_colours}]})
    exact = all(e["exact"] for e in spectra["entries"])
    fig.update_layout(
        title="Singular values of the task vectors<br><sub>IP-Merging Fig. 4: are the reasoner's larger?"
              + ("" if exact else f" (large matrices: randomized top-{spectra['k']})") + "</sub>",
        xaxis_title="index i of the singular value (largest first)",
        yaxis={"title": "singular value σ_i (log scale)", "type": "log", "dtick": 1, "exponentformat": "power"},
        sliders=[{"active": 0, "steps": steps, "currentvalue": {"prefix": "decoder layer: "}, "pad": {"t": 50}}],
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.12,
                      "showactive": True}],
        legend={"title": "solid: VLM, dashed: reasoner"},
        height=FIGURE_HEIGHT + 60,  # the layer slider under the plot
    )
    return fig


def ratio_figure(spectra: dict) -> go.Figure:
    """Nuclear-norm ratio sum S_v / sum S_r per layer and module (IP-Merging's rescale lambda)."""
    z, modules = spectra["ratio"], spectra["modules"]
    fig = go.Figure(_heatmap(z, modules, _hover_grid(z, modules, "ΣS_v / ΣS_r"), "Viridis",
                             colorbar={"title": "ΣS_v/ΣS_r"}))
    fig.update_layout(title={"text": "Nuclear-norm ratio of the task vectors, VLM / reasoner"
                                     "<br><sub>below 1: the reasoner's is larger</sub>"},
                      xaxis_title="projection matrix", yaxis_title="decoder layer", height=FIGURE_HEIGHT)
    return fig


# ------------------------------------------------------------------------------------ similarity
def similarity_figure(sim: dict) -> go.Figure:
    """Cosine (with the whole-block column) and IP-Merging subspace similarity heatmaps; below, every
    cosine against what two random task vectors of the same shapes give (analysis.chance_cosine)."""
    modules = sim["modules"]
    cos_cols = modules + ["whole block"]
    cos = [row + [b] for row, b in zip(sim["cos"], sim["block_cos"])]
    band = chance_cosine.bands(sim)
    # wide gaps: the cosine colour bar sits between the two maps, clear of the second one's layer labels
    fig = make_subplots(rows=2 if band else 1, cols=2, horizontal_spacing=0.26, vertical_spacing=0.24,
                        specs=[[{}, {}], [{"colspan": 2}, None]] if band else None, subplot_titles=(
        "cosine(τ_v, τ_r) (FRANK Fig. 3)",
        f"subspace similarity, top-{sim['rank']} (IP-Merging)",
        *(["each cosine against random task vectors of its shape (grey: 95% band)"] if band else [])))
    fig.add_trace(_heatmap(cos, cos_cols, _hover_grid(cos, cos_cols, "cos"), "RdBu", zmin=-1, zmax=1, zmid=0,
                           colorbar={"title": "cos", "x": 0.39, "thickness": 14, "len": 0.5 if band else 1,
                                     "y": 0.78 if band else 0.5}),
                  1, 1)
    sub = sim["subspace"]
    fig.add_trace(_heatmap(sub, modules, _hover_grid(sub, modules, "subspace similarity"), "Viridis",
                           zmin=0, zmax=1, colorbar={"title": "sim", "x": 1.0, "thickness": 14, "len": 0.5 if band else 1,
                                                     "y": 0.78 if band else 0.5}), 1, 2)
    if band:
        _chance_strip(fig, cos, cos_cols, [band[0][m] for m in modules], band[1])
    fig.update_layout(title="How aligned are the VLM's and the reasoner's task vectors?",
                      height=820 if band else FIGURE_HEIGHT, margin={"l": 70, "r": 20, "b": 130})
    if not band:  # with the strip below, the column names say it and a title would collide with its title
        fig.update_xaxes(title_text="projection matrix", row=1)
    fig.update_yaxes(title_text="decoder layer", row=1, col=1)
    return fig


def _chance_strip(fig, cos, cols, module_bands, block_bands) -> None:
    """Row 2: one point per layer and column, over the band random vectors of that shape fill."""
    widths = module_bands + [max(block_bands)]  # the blocks share their shapes: one band
    fig.add_trace(go.Bar(x=cols, y=[2 * w for w in widths], base=[-w for w in widths], marker_color="#bbbbbb",
                         opacity=0.6, name="random task vectors: 95% of cosines (±1.96/√d)",
                         customdata=widths, hovertemplate="%{x}: random vectors of this shape give |cos| "
                                                           "< %{customdata:.4f} 95% of the time<extra></extra>"),
                  2, 1)
    for i, row in enumerate(cos):
        fig.add_trace(go.Scatter(x=cols, y=[_nan(v) for v in row], mode="markers", name=f"layer {i}",
                                 marker={"color": PALETTE[i % len(PALETTE)], "size": 7},
                                 text=[f"layer {i}, {c}: cos = {_fmt(v, '.4f')}, chance band ±{w:.4f}"
                                       for c, v, w in zip(cols, row, widths)],
                                 hovertemplate="%{text}<extra></extra>"), 2, 1)
    fig.update_yaxes(title_text="cosine", zeroline=True, row=2, col=1)
    # under the strip, across the width: a legend on the right would narrow all three plots
    fig.update_layout(legend={"orientation": "h", "x": 0, "y": -0.16, "yanchor": "top"}, barmode="overlay")


# ------------------------------------------------------------------------------------- attention
def attention_shape(att: dict) -> str:
    """What the measured a_l do, in words, against FRANK Fig. 2's decay with depth."""
    shares, r2 = att["shares"], att.get("r2")
    if len(shares) < 3:
        return "FRANK Fig. 2 expects a decay with depth"
    low = min(range(len(shares)), key=shares.__getitem__)
    path = f"{shares[0]:.0%} at layer 0, {shares[low]:.0%} at layer {low}, {shares[-1]:.0%} at layer {len(shares) - 1}"
    fit = "" if r2 is None else f"; the fitted decay explains {r2:.0%} of the variance"
    if 0 < low < len(shares) - 1 and shares[-1] > shares[low] + (shares[0] - shares[low]) / 2:
        return f"FRANK Fig. 2 expects a decay with depth; here it dips and comes back ({path}){fit}"
    verdict = "decays with depth, as in FRANK Fig. 2" if shares[-1] < shares[0] else "does not decay (FRANK Fig. 2 expects it to)"
    return f"Here it {verdict} ({path}){fit}"


def _wrapped(text: str, width: int = 95) -> str:
    """A subtitle in lines plotly can show: it never wraps one itself, and cuts it at the plot's edge."""
    return "<br>".join(textwrap.wrap(text, width))


def attention_figure(att: dict) -> go.Figure:
    """a_l per layer with the fitted exponential and beta in the legend (FRANK Fig. 2)."""
    shares = att["shares"]
    layers = list(range(len(shares)))
    beta, c = att["beta"], att["C"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=layers, y=shares, mode="markers+lines", name=f"measured a_l ({att.get('n_images', '?')} images)",
        hovertemplate="layer %{x}: text puts %{y:.1%} of its attention on the image<extra></extra>"))
    fine = [i / 10 for i in range(0, 10 * (len(shares) - 1) + 1)] or [0]
    fig.add_trace(go.Scatter(
        x=fine, y=[c * math.exp(-beta * x) for x in fine], mode="lines", line={"dash": "dash"},
        name=f"fit a_l = {c:.3g}·exp(−β·l), β = {beta:.3f}, R² = {_fmt(att.get('r2'), '.2f')}",
        hovertemplate="fit at layer %{x:.1f}: %{y:.1%}<extra></extra>"))
    fig.update_layout(title={"text": "Visual attention per layer: share of text→image attention"
                                     f"<br><sub>{_wrapped(attention_shape(att))}</sub>"},
                      xaxis={"title": "decoder layer l", "dtick": 1},  # whole layers only
                      yaxis_title="a_l = text→image / (text→image + text→text)", yaxis_tickformat=".0%",
                      legend={"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"}, height=FIGURE_HEIGHT)
    return fig


# -------------------------------------------------------------------------------------- knockout
def _drop_trace(label: str, ko: dict, g: str, s: str, dash: str, first: bool) -> go.Scatter:
    """One suite's drop per knocked-out layer, with its 95% paired-bootstrap interval as error bars."""
    base, drops = ko["baseline"], ko["drop"][g][s]
    ci = ko.get("drop_ci", {}).get(g, {}).get(s)
    noise = ko.get("noise", {}).get(g, {}).get(s)
    control = " (control, no image)" if s == ko.get("control") else ""
    err, text = None, [""] * len(drops)
    if ci:
        err = {"type": "data", "symmetric": False, "array": [hi - d for d, (_, hi) in zip(drops, ci)],
               "arrayminus": [d - lo for d, (lo, _) in zip(drops, ci)], "thickness": 1, "width": 3}
        text = [f" (95% interval {lo:+.0%} to {hi:+.0%}{', within noise' if nz else ''})"
                for (lo, hi), nz in zip(ci, noise)]
    n = ko.get("n", {}).get(s)
    return go.Scatter(
        x=ko["layers"], y=drops, mode="lines+markers", error_y=err, text=text,
        name=f"{label}: {s}{control} (intact {base[s]:.0%}{f', {n} items' if n else ''})",
        legendgroup=f"{label}{s}", showlegend=first,
        line={"color": SUITE_COLOURS.get(s), "dash": dash, "width": 3 if control else 2},
        hovertemplate=f"{label}, layer %{{x}} {g} knocked out: {s}{control} accuracy drops by "
                      f"%{{y:.1%}}%{{text}} (intact: {base[s]:.1%})<extra></extra>")


def knockout_figure(results: dict) -> go.Figure:
    """results: {model label: knockout() output}. Drop in accuracy per knocked-out layer, beside the
    text-only control's drop, each with its 95% interval."""
    groups = ("attention", "mlp")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=(
        "attention (q,k,v,o) knocked out", "MLP (gate,up,down) knocked out"))
    dashes = ("solid", "dash", "dot", "dashdot")
    for k, (label, ko) in enumerate(results.items()):
        for col, g in enumerate(groups, start=1):
            if g not in ko["drop"]:
                continue
            for s in ko["suites"]:
                fig.add_trace(_drop_trace(label, ko, g, s, dashes[k % len(dashes)], col == 1), 1, col)
    fig.add_hline(y=0, line={"color": "grey", "width": 1})
    partial = next((ko["partial"] for ko in results.values() if ko.get("partial")), None)
    # a short first line: plotly's toolbar sits over the end of a long one
    fig.update_layout(title={"text": "Layer knockout: the accuracy each layer's knockout costs"
                                     "<br><sub>knocked out: the layer's weights set to 1/out · purple: text_math, no "
                                     "image (the control): a layer reads the image<br>where perception drops and it "
                                     "holds · bars: 95% intervals · below 0: the knockout helped</sub>"
                                     + (f"<br><sub><b>Partial</b> ({partial})</sub>" if partial else ""),
                             "y": 0.98, "yanchor": "top"}, margin={"t": 150, "b": 60}, height=680,
                      legend={"orientation": "h", "x": 0, "y": -0.16, "yanchor": "top"})
    fig.update_xaxes(title_text="decoder layer knocked out", dtick=1)
    fig.update_yaxes(title_text="accuracy drop vs intact model", tickformat=".0%", col=1)
    return fig


# --------------------------------------------------------------------------------------- changes
def changes_figure(ch: dict) -> go.Figure:
    """Relative change ||W_merged − W_v|| / ||W_v|| per layer and module."""
    z, modules = ch["rel"], ch["modules"]
    text = [[f"layer {i}, {m}: relative norm change {_fmt(v * 100 if v is not None else None, '.2f')}% "
             f"(‖W_merged − W_v‖ / ‖W_v‖ = {_fmt(v, '.4f')})" for m, v in zip(modules, row)]
            for i, row in enumerate(z)]
    fig = go.Figure(_heatmap(z, modules, text, "Viridis", zmin=0, colorbar={"title": "relative change"}))
    fig.update_layout(title="Where the merge changed the VLM's language model", xaxis_title="weight",
                      yaxis_title="decoder layer", height=FIGURE_HEIGHT)
    return fig


# ---------------------------------------------------------------------------------- merge report
def _with_grid(report: dict, bars: go.Bar, grid: dict) -> go.Figure:
    """The change bars above the method's per-layer grid (e.g. learned gates) as a heatmap."""
    fig = make_subplots(rows=2, cols=1, row_heights=[0.35, 0.65], vertical_spacing=0.26,
                        subplot_titles=("‖W − W_v‖ / ‖W_v‖ per layer", grid["title"]))
    fig.add_trace(bars, row=1, col=1)
    fig.add_trace(go.Heatmap(z=grid["z"], x=grid["cols"], y=grid["rows"], zmin=grid["zmin"], zmax=grid["zmax"],
                             colorscale="Viridis", hovertext=grid["hover"], hovertemplate="%{hovertext}<extra></extra>",
                             colorbar={"len": 0.6, "y": 0.3}), row=2, col=1)
    fig.update_yaxes(tickformat=".1%", row=1, col=1)
    fig.update_xaxes(tickangle=45, tickfont={"size": 9}, row=2, col=1)
    fig.update_layout(title={"text": f"What {report['method']} did", "font": {"size": 14}}, showlegend=False,
                      height=300 + 18 * len(grid["rows"]) + 120, margin={"l": 60, "r": 10, "t": 60, "b": 120})
    fig.update_annotations(font_size=11)
    return fig


def merge_report_figure(report: dict) -> go.Figure:
    """One bar per decoder layer: how far the merge moved the VLM's weights (relative norm)."""
    rel = report["relative_change"]
    keys = [k for k in rel if k != "other"]
    labels = [f"layer {k}" for k in keys] + (["outside layers"] if "other" in rel else [])
    values = [rel[k] for k in keys] + ([rel["other"]] if "other" in rel else [])
    notes = [merge_report.layer_note(report, k) for k in keys] + ([""] if "other" in rel else [])
    text = [f"{lab}: ‖W − W_v‖ / ‖W_v‖ = {v:.2%}{n}" for lab, v, n in zip(labels, values, notes)]
    bars = go.Bar(x=labels, y=values, marker_color=REASONER_COLOUR, hovertext=text,
                  hovertemplate="%{hovertext}<extra></extra>")
    grid = merge_report.diagnostic_grid(report)
    if grid is not None:
        return _with_grid(report, bars, grid)
    fig = go.Figure(bars)
    # A narrow column in the app: a two-line title, no axis title (the hover text says it in full).
    fig.update_layout(title={"text": f"How far {report['method']} moved each layer<br>"
                                     "<sub>relative norm ‖W − W_v‖ / ‖W_v‖</sub>", "font": {"size": 14}},
                      yaxis_tickformat=".1%", height=280, margin={"l": 50, "r": 10, "t": 60, "b": 40})
    return fig
