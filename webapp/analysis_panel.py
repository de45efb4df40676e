"""The "Why it works" panel: one sub-tab per analysis figure, computed in the worker (UI side)."""

from __future__ import annotations

import gradio as gr

from merging.errors import LabError
from webapp.lab import Lab, follow_status, session_of
from webapp.models_panel import ModelsPanel
from webapp.safety import check_images

ABOUT = {
    "spectra": "Singular values of the two task vectors (VLM − base and reasoner − base) per layer and module. "
               "IP-Merging's observation: the reasoner's are larger, so its update is rescaled before merging.",
    "similarity": "How aligned the two task vectors are. Cosine near 0 everywhere means they are nearly "
                  "orthogonal (FRANK Fig. 3): adding the reasoner's barely disturbs what the VLM learned.",
    "attention": "Share of attention that text positions pay to image tokens, per layer, with the fitted "
                 "exponential decay a_l ≈ C·exp(−β·l) (FRANK Fig. 2). Upload your own images or use the samples.",
    "knockout": "Accuracy drop when one layer's attention or MLP is replaced by a constant (BR2V): perception "
                "lives in early layers, math reasoning in middle/late layers. Slow: one evaluation per layer.",
    "changes": "Where this tab's merge changed the model: ‖W_merged − W_vlm‖ / ‖W_vlm‖ per layer and module.",
}
TITLES = {"spectra": "Singular values", "similarity": "Similarity", "attention": "Attention decay",
          "knockout": "Layer knockout", "changes": "Change map"}


def _figure(fig_json: str):
    import plotly.io as pio

    return pio.from_json(fig_json)


def _runner(lab: Lab, name: str, n_plots: int):
    def run(preset, vlm, reasoner, base, recipe, *extra, request: gr.Request = None):
        blank = [gr.skip()] * n_plots
        try:
            triple = ({k: recipe.get(k) for k in ("vlm", "reasoner", "base")}
                      if recipe and name in ("changes", "knockout") else lab.triple(preset, vlm, reasoner, base))
            args = {"name": name, "triple": triple, "recipe": recipe, **_extra_args(name, extra)}
            check_images(args.get("images") or [], lab.read_roots)
        except LabError as e:
            yield (f"⛔ {e}", *blank)
            return
        job = lab.client.submit("analysis", args, session_of(request))
        for text, end in follow_status(lab.client, job, f"Computing {TITLES[name].lower()}"):
            if end is None:
                yield (text, *blank)
                continue
            ev, payload, el = end
            if ev != "result":
                yield (f"{'⏹' if ev == 'cancelled' else '❌'} {payload}", *blank)
                return
            figs = [_figure(f) for f in payload["figures"]][:n_plots]
            figs += [gr.skip()] * (n_plots - len(figs))
            yield (f"✅ {payload.get('summary', '')} ({el:.1f} s)", *figs)

    return run


def _extra_args(name: str, extra) -> dict:
    if name == "spectra":
        return {"k": int(extra[0])}
    if name == "similarity":
        return {"rank": int(extra[0])}
    if name == "attention":
        files = extra[0] or []
        files = [files] if isinstance(files, (str, dict)) else files
        paths = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "name", None))
                 for f in files]
        return {"images": [p for p in paths if p], "question": extra[1]}
    if name == "knockout":
        return {"limit": int(extra[0])}
    return {}


def _handlers(lab: Lab) -> dict:
    """One function per analysis, with named parameters (the API's keyword arguments)."""
    runs = {n: _runner(lab, n, 2 if n == "spectra" else 1) for n in TITLES}

    def spectra(preset, vlm, reasoner, base, recipe, k, request: gr.Request = None):
        yield from runs["spectra"](preset, vlm, reasoner, base, recipe, k, request=request)

    def similarity(preset, vlm, reasoner, base, recipe, rank, request: gr.Request = None):
        yield from runs["similarity"](preset, vlm, reasoner, base, recipe, rank, request=request)

    def attention(preset, vlm, reasoner, base, recipe, images, question, request: gr.Request = None):
        yield from runs["attention"](preset, vlm, reasoner, base, recipe, images, question, request=request)

    def knockout(preset, vlm, reasoner, base, recipe, items_per_suite, request: gr.Request = None):
        yield from runs["knockout"](preset, vlm, reasoner, base, recipe, items_per_suite, request=request)

    def changes(preset, vlm, reasoner, base, recipe, request: gr.Request = None):
        yield from runs["changes"](preset, vlm, reasoner, base, recipe, request=request)

    return {"spectra": spectra, "similarity": similarity, "attention": attention, "knockout": knockout,
            "changes": changes}


def build(lab: Lab, models: ModelsPanel, recipe_state: gr.State):
    base_inputs = [*models.inputs, recipe_state]
    handlers = _handlers(lab)
    with gr.Tabs():
        for name in ("similarity", "spectra", "attention", "knockout", "changes"):
            with gr.Tab(TITLES[name], id=f"an-{name}"):
                gr.Markdown(ABOUT[name])
                extra = []
                with gr.Row():
                    if name == "spectra":
                        extra.append(gr.Slider(4, 128, value=32, step=1, label="singular values per matrix (k)"))
                    elif name == "similarity":
                        extra.append(gr.Slider(1, 128, value=32, step=1, label="subspace rank",
                                               info="top right-singular vectors compared (IP-Merging's k)"))
                    elif name == "attention":
                        extra.append(gr.File(file_count="multiple", file_types=["image"],
                                             label="your images (optional; default: the bundled samples)"))
                        extra.append(gr.Textbox(value="describe the image .", label="question asked with each image"))
                    elif name == "knockout":
                        extra.append(gr.Slider(2, 40, value=8, step=1, label="eval items per suite",
                                               info="VLM, plus this tab's merged model when there is one"))
                    btn = gr.Button("Compute", variant="primary", elem_id=f"compute-{name}", scale=0,
                                    min_width=120)
                    stop = gr.Button("Cancel", variant="stop", scale=0, min_width=100)
                status = gr.Markdown(elem_id=f"status-{name}")
                plots = [gr.Plot(label=TITLES[name], elem_id=f"plot-{name}")]
                if name == "spectra":
                    plots.append(gr.Plot(label="nuclear-norm ratio", elem_id="plot-spectra-ratio"))
                btn.click(handlers[name], base_inputs + extra, [status, *plots], api_name=name,
                          concurrency_limit=16)

                def cancel(request: gr.Request = None):
                    n = lab.client.cancel_session(session_of(request), ("analysis",))
                    return "⏹ Cancelling…" if n else "Nothing is running."

                stop.click(cancel, None, status, queue=False, api_visibility="private")
