"""The "Why it works" panel: one sub-tab per registered analysis (analysis.analyses), its controls
generated from the analysis' knobs, computed in the worker (UI side)."""

from __future__ import annotations

import inspect

import gradio as gr
import plotly.io as pio

from analysis import analyses
from merging.errors import LabError
from merging.layout import ROLES
from webapp.safety import check_images
from webapp.ui import cancel_button, glossary, handout_panel, plot_export, shipped
from webapp.ui.lab import Lab, follow_result, session_of
from webapp.ui.models_panel import ModelsPanel

BASE_PARAMS = ("preset", "vlm", "reasoner", "base", "recipe")


def _figure(fig_json: str):
    return pio.from_json(fig_json)


def _paths(files) -> list[str]:
    """Paths of gr.File values (strings, dicts or file objects; one or many)."""
    files = files or []
    files = [files] if isinstance(files, (str, dict)) else files
    paths = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "name", None))
             for f in files]
    return [p for p in paths if p]


def _submit(lab: Lab, a, preset, vlm, reasoner, base, recipe, values) -> dict:
    """The worker job's arguments; LabError for a bad triple or image."""
    triple = ({k: recipe.get(k) for k in ROLES}
              if recipe and a.on_merge else lab.triple(preset, vlm, reasoner, base))
    args = {"name": a.name, "triple": triple, "recipe": recipe}
    for k, v in zip(a.knobs, values):
        args[k.name] = _paths(v) if k.kind == "images" else (int(v) if k.kind == "int" else v)
    check_images(args.get("images") or [], lab.read_roots)
    return args


def _handler(lab: Lab, a, n_extra: int = 0, live: bool = False):
    """The analysis' event handler, with one named parameter per knob (the API's keywords).
    n_extra: outputs after the plots (attention: the fitted beta and the button that uses it).
    live: the last input is the "compute live" tick (an analysis that ships results, see shipped)."""
    n_plots = len(a.figures)

    def run(*values):
        *values, request = values  # gradio passes the gr.Request last (see __signature__ below)
        preset, vlm, reasoner, base, recipe, *knobs = values
        knobs, force = (knobs[:-1], bool(knobs[-1])) if live else (knobs, False)
        blank = [gr.skip()] * (n_plots + n_extra)
        try:
            args = _submit(lab, a, preset, vlm, reasoner, base, recipe, knobs)
        except LabError as e:
            yield (f"✗ {e}", *blank)
            return
        e = shipped.analysis_entry(a.name, args["triple"], args["recipe"], args) if live and not force else None
        if e is not None:  # shipped for these settings: no need to wait for the worker
            figs, summary = shipped.analysis_view(a.name, e)
            yield (f"✓ {shipped.status(e, 'Compute')}  \n{summary}", *figs)
            return
        job = lab.client.submit("analysis", {**args, "live": force}, session_of(request))
        got = yield from follow_result(lab.client, job, f"Computing {a.title.lower()}", blank)
        if got is None:
            return
        payload, el = got
        figs = [_figure(f) for f in payload["figures"]][:n_plots]
        figs += [gr.skip()] * (n_plots - len(figs))
        extra = (payload["beta"], gr.update(visible=True, value=f"Use β = {payload['beta']:.3f} for FRANK's "
                                                              "prior")) if n_extra else ()
        summary = payload.get("summary", "")
        mark = "■" if summary.startswith("**Partial") else "✓"  # a cancel that kept the finished part
        ship = "".join(f"  \nThe VLM's part: {m}." for m in payload.get("precomputed") or ())
        yield (f"{mark} {summary} ({el:.1f} s){ship}", *figs, *extra)

    names = [*BASE_PARAMS, *(k.api_name for k in a.knobs), *(["live"] if live else [])]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                    annotation=gr.Request))
    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {"request": gr.Request}  # gradio finds the request by its type hint
    run.__name__ = a.name
    return run


def _control(k):
    if k.kind == "int":
        return gr.Slider(k.lo, k.hi, value=k.default, step=1, label=k.label, info=k.hint or None)
    if k.kind == "images":
        return gr.File(file_count="multiple", file_types=["image"], label=k.label)
    return gr.Textbox(value=k.default, label=k.label, info=k.hint or None)


def _tab(lab: Lab, a, base_inputs):
    """One analysis' controls, status and plots; for attention, (beta state, button) else None."""
    links = glossary.analysis_links(a.name)
    gr.Markdown(a.about + (f"  \n<small>{links} · symbols: see the Glossary below</small>" if links else ""))
    ships = hasattr(a, "key")  # results of the bundled VLM at the defaults may be shipped (shipped.py)
    ship = shipped.analysis_default(a.name) if ships else None
    figs, summary = shipped.analysis_view(a.name, ship) if ship else ([None] * len(a.figures), "")
    with gr.Row():
        extra = [_control(k) for k in a.knobs]
        btn = gr.Button("Compute", variant="primary", elem_id=f"compute-{a.name}", scale=0, min_width=120)
        stop = gr.Button("Cancel", variant="stop", scale=0, min_width=100)
        if ships:
            extra.append(gr.Checkbox(False, label=shipped.LIVE_LABEL, elem_id=f"live-{a.name}", scale=0,
                                     min_width=300))
    status = gr.Markdown(f"{shipped.status(ship, 'Compute')}  \n{summary}" if ship else "",
                         elem_id=f"status-{a.name}")
    plots = [plot_export.plot(fig, label=f.label, elem_id=f.elem_id) for fig, f in zip(figs, a.figures)]
    use_beta = None
    if a.name == "attention":  # one click from the fit to FRANK's knobs (wired by page_state)
        use_beta = (gr.State(None), gr.Button("Use this β for FRANK's prior", visible=False, elem_id="use-beta",
                                              size="sm"))
    outs = [status, *plots, *(use_beta or ())]
    btn.click(_handler(lab, a, 2 if use_beta else 0, ships), base_inputs + extra, outs, api_name=a.name,
              concurrency_limit=16)

    cancel_button.wire(lab, stop, ("analysis",), api_name=f"cancel_{a.name}")
    return use_beta


def build(lab: Lab, models: ModelsPanel, recipe_state: gr.State):
    """The panel; returns (fitted beta state, its 'use in FRANK' button)."""
    base_inputs = [*models.inputs, recipe_state]
    use_beta = None
    with gr.Tabs():
        for name in analyses.names():
            a = analyses.get(name)
            with gr.Tab(a.title, id=f"an-{name}"):
                use_beta = _tab(lab, a, base_inputs) or use_beta
    with gr.Accordion("Glossary: the symbols in these plots, and the papers", open=False, elem_id="glossary"):
        gr.Markdown(glossary.markdown())
    handout_panel.build(lab, recipe_state)
    return use_beta
