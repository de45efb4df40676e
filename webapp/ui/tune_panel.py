"""The "Sweep & tune" tab: one knob of this tab's merge as accuracy curves, and a method's knobs
auto-tuned on the dev split, both scored in place in the worker (UI side).

Sweep: the worker merges the loaded VLM at each value and scores it (webapp/worker/tune_jobs.py);
each point arrives as a "partial" event and the curves are redrawn with it. Tune: optuna's search
on the dev split; its Pareto front is drawn over the last leaderboard this app ran (if any), and a
front point is loaded into the merge panel as a leaderboard row is (url_state + MergePanel.apply;
a start -> end schedule goes into the per-layer box as a 2-anchor gradient): by a click on the
point, or by its entry in the list below the plot (worded as its hover, knob_figures.front_label).
gr.Plot has no click event (its only event is change), so the click comes through a page-level hook
(webapp/ui/front_click.py) that writes the point's label into a hidden textbox; its change runs the
same loader as the list's button.
"""

from __future__ import annotations

import json

import gradio as gr

from analysis.knob_figures import FRONT_LABEL_AT, describe, front_label, sweep_figure, tune_figure
from merging import methods
from merging.errors import LabError
from webapp import presets
from webapp.protocol import SWEEP_LIMITS, TUNE_LIMITS
from webapp.ui import cancel_button, front_click, plot_export
from webapp.ui.knobs_loader import knobs_into_merge
from webapp.ui.lab import Lab, follow_result, follow_status, session_of
from webapp.ui.merge_panel import MergePanel
from webapp.ui.models_panel import ModelsPanel
from webapp.ui.variants import variant_label

ABOUT_SWEEP = ("**Sweep** one knob of the merge live in the chat (the last one made with **Merge** in 2 · Merge): "
               "the worker merges the loaded model at each value "
               "(no reload), scores it on the held-out suites and draws each point as it is scored; the bands are "
               "95% Wilson intervals. The checkpoint's weights are back afterwards, also after Cancel.")
ABOUT_TUNE = ("**Tune** a method's knobs with optuna's multi-objective search (NSGA-II) on the **dev split** "
              "(never the held-out items), maximising perception and visual math; per-layer knobs are searched "
              "as a start → end schedule. A new study first scores the method's defaults and the leaderboard's "
              "grid points (4-7 points in all), then searches beyond them; running it again continues the same "
              "study. The chosen point (perception within 3 points of the VLM's on dev, then the best visual "
              "math) is scored on the held-out suites.")
NOTHING_MERGED = "Nothing merged yet: press **Merge** in 2 · Merge, then sweep one of its knobs."
CLICK_INFO = "or click the point on the plot above"
TOY_ONLY = "the tuner runs on the bundled toy family only (its dev split is made from the toy tasks)"


class Tap:
    """The client as follow_status sees it, keeping the job's "partial" events for the handler."""

    def __init__(self, client, seen: list):
        self.client, self.seen = client, seen

    def follow(self, job):
        for ev, payload in self.client.follow(job):
            if ev == "partial":
                self.seen.append(payload)
            yield ev, payload

    def cancel(self, job) -> None:
        self.client.cancel(job)


def parse_values(text: str) -> list[float]:
    out = []
    for part in str(text or "").replace(";", ",").split(","):
        if part.strip():
            try:
                out.append(float(part))
            except ValueError:
                raise LabError(f"values: {part.strip()!r} is not a number (e.g. 0, 0.25, 0.5, 1)") from None
    if not out:
        raise LabError("values: give the knob's values, e.g. 0, 0.25, 0.5, 1")
    return out


def _whole(v, name: str, limits: dict) -> int:
    lo, hi, _ = limits[name]
    if v is None or not lo <= v <= hi or not float(v).is_integer():
        raise LabError(f"{name.replace('_', ' ')}: enter a whole number from {lo} to {hi}")
    return int(v)


def _sweep_handler(lab: Lab):
    def run(recipe, knob, values, limit, request: gr.Request = None):
        """One knob of this tab's merge as accuracy curves (points drawn as they are scored)."""
        try:
            if not isinstance(recipe, dict):
                raise LabError("merge something in 2 · Merge first: the sweep varies one knob of that recipe")
            args = {"recipe": recipe, "knob": knob, "values": parse_values(values),
                    "limit": _whole(limit, "limit", SWEEP_LIMITS)}
        except LabError as e:
            yield f"✗ {e}", gr.skip()
            return
        seen: list = []
        job = lab.client.submit("sweep", args, session_of(request))
        shown = 0
        for text, end in follow_status(Tap(lab.client, seen), job, f"Sweeping {knob}"):
            fig = gr.skip()
            if len(seen) > shown:
                shown = len(seen)
                fig = sweep_figure({"method": recipe["method"], "knob": knob, "limit": args["limit"], "points": seen})
            if end is None:
                yield text, fig
                continue
            ev, payload, el = end
            if ev != "result":
                kept = f" ({len(seen)} point(s) kept above)" if seen else ""
                yield f"{'■' if ev == 'cancelled' else '✗'} {payload}{kept}; the model holds the checkpoint's weights", fig
                return
            yield (f"✓ {len(payload['points'])} values of {knob} scored in {el:.1f} s ({args['limit']} items per "
                   "suite); the model holds the checkpoint's weights again.", sweep_figure(payload))

    return run


def last_leaderboard(lab: Lab) -> dict | None:
    """The newest leaderboard this app computed (its cache folder), to draw the front over."""
    found = sorted((lab.cache_dir / "leaderboard").glob("*/leaderboard.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    try:
        return json.loads(found[-1].read_text())
    except (OSError, ValueError):
        return None


def front_choices(result: dict) -> list[tuple[str, int]]:
    """The list's entries, each worded as the plot's hover on that point (front_label)."""
    return [(front_label(result, p), i) for i, p in enumerate(result["front"])]


def _tune_args(preset, method, trials, seconds, limit) -> dict:
    if preset != presets.DEFAULT:
        raise LabError(TOY_ONLY)
    if method not in methods.names():
        raise LabError("choose a method to tune")
    args = {"method": method, "trials": _whole(trials, "trials", TUNE_LIMITS),
            "seconds": _whole(seconds or 0, "seconds", TUNE_LIMITS), "limit": _whole(limit, "limit", TUNE_LIMITS)}
    return args


def _tune_handler(lab: Lab):
    def run(preset, method, trials, seconds, limit, request: gr.Request = None):
        """Search a method's knobs on the dev split (optuna); the front over the leaderboard's points."""
        keep = (gr.skip(),) * 3
        try:
            args = _tune_args(preset, method, trials, seconds, limit)
        except LabError as e:
            yield (f"✗ {e}", *keep)
            return
        args["triple"] = {"vlm": str(presets.TOY_ROOT / "vlm"), "reasoner": str(presets.TOY_ROOT / "math"),
                          "base": str(presets.TOY_ROOT / "base")}
        job = lab.client.submit("tune", args, session_of(request))
        got = yield from follow_result(lab.client, job, f"Tuning {method}", keep)
        if got is None:
            return
        payload, el = got
        r = payload["result"]
        b = r["best"]
        test = "  ".join(f"{s} {100 * v['acc']:.1f} [{100 * v['lo']:.1f}, {100 * v['hi']:.1f}]"
                         for s, v in b["test"].items())
        yield (f"✓ {r['trials']} trials in the study ({el:.1f} s this run); chosen: **{describe(b['knobs'])}**; "
               f"held-out: {test}", tune_figure(r, last_leaderboard(lab), in_app=True),
               gr.update(choices=front_choices(r), value=None, info=CLICK_INFO), r)

    return run


def _load_handler(merge: MergePanel, load_status: gr.Markdown):
    def load(index, result, dims):
        """Show a front point's knobs in the merge panel (a schedule in the per-layer box)."""
        if result is None or index is None:
            return {load_status: "Run the tuner, then pick a point of the front."}
        p = result["front"][int(index)]
        what = f"{result['method']} ({describe(p['knobs'])})"
        return knobs_into_merge(merge, dims, result["method"], p["knobs"], what, "tuner", load_status)

    return load


def _click_handler(load, load_status: gr.Markdown, pick: gr.Dropdown, box: gr.Textbox):
    def click(label, result, dims):
        """A click on a front point: its label (the hook's box) is looked up among the front's and loaded."""
        if not label:
            return {box: gr.skip()}  # the box set back to "" after a load: nothing to do
        front = result["front"] if result else []
        index = next((i for i, p in enumerate(front) if front_label(result, p) == label), None)
        if index is None:
            return {box: "", load_status: "✗ that point is not on the tuner's front shown here: run the tuner again"}
        return {**load(index, result, dims), pick: index, box: ""}

    return click


def _knob_choices(recipe, chosen):
    """The sweep's knobs and line follow the live merge (what the sweep varies), not the panel's method
    while it is being changed; a knob still offered stays chosen."""
    if not isinstance(recipe, dict):
        return gr.skip(), NOTHING_MERGED
    try:
        names = [p.name for p in methods.get(recipe["method"]).params if p.kind is float]
    except LabError:
        names = []
    line = f"Sweeps a knob of **{variant_label(recipe)}**, the merge live in the chat."
    return gr.update(choices=names, value=chosen if chosen in names else names[0] if names else None), line


def build(lab: Lab, models: ModelsPanel, merge: MergePanel) -> None:
    gr.Markdown(ABOUT_SWEEP)
    sweeps = gr.Markdown(NOTHING_MERGED, elem_id="sweep-of")
    with gr.Row():
        first = [p.name for p in methods.get(methods.default_method().name).params if p.kind is float]
        knob = gr.Dropdown(first, value=first[0] if first else None, label="knob", elem_id="sweep-knob", min_width=150)
        values = gr.Textbox("0, 0.25, 0.5, 0.75, 1", label="values", elem_id="sweep-values", min_width=220)
        limit = gr.Number(SWEEP_LIMITS["limit"][2], label="held-out items per suite", precision=0,
                          elem_id="sweep-limit", min_width=150)
    with gr.Row():
        sweep_btn = gr.Button("Run sweep", variant="primary", elem_id="sweep-btn", scale=0, min_width=200)
        sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel", scale=0, min_width=100)
    sweep_status = gr.Markdown(elem_id="status-sweep")
    sweep_plot = plot_export.plot(label="accuracy against the knob", elem_id="sweep-plot")
    sweep_btn.click(_sweep_handler(lab), [merge.recipe_state, knob, values, limit], [sweep_status, sweep_plot],
                    api_name="sweep", concurrency_limit=16)
    cancel_button.wire(lab, sweep_cancel, ("sweep",))
    merge.recipe_state.change(_knob_choices, [merge.recipe_state, knob], [knob, sweeps], queue=False,
                              api_visibility="private")

    gr.Markdown("---\n" + ABOUT_TUNE)
    with gr.Row():
        method = gr.Dropdown(methods.names(), value=methods.default_method().name, label="method",
                             elem_id="tune-method", min_width=150)
        numbers = [gr.Number(TUNE_LIMITS[k][2], label=label, precision=0, elem_id=f"tune-{k}", min_width=120)
                   for k, label in (("trials", "trials this run"), ("seconds", "seconds at most (0: no limit)"),
                                    ("limit", "dev items per suite"))]
    with gr.Row():
        tune_btn = gr.Button("Run tuner", variant="primary", elem_id="tune-btn", scale=0, min_width=200)
        tune_cancel = gr.Button("Cancel", variant="stop", elem_id="tune-cancel", scale=0, min_width=100)
    tune_status = gr.Markdown(elem_id="status-tune")
    tune_plot = plot_export.plot(label="dev perception vs visual math: trials, Pareto front", elem_id="tune-plot")
    result = gr.State(None)
    pick = gr.Dropdown([], label="a point of the front", elem_id="tune-point", info="run the tuner first")
    load_btn = gr.Button("Load into 2 · Merge", elem_id="tune-load", scale=0, min_width=260)
    load_status = gr.Markdown(elem_id="status-tune-load")
    tune_btn.click(_tune_handler(lab), [models.preset, method, *numbers], [tune_status, tune_plot, pick, result],
                   api_name="tune", concurrency_limit=16)
    cancel_button.wire(lab, tune_cancel, ("tune",))
    load = _load_handler(merge, load_status)
    load_btn.click(load, [pick, result, models.dims], [*merge.apply_targets, merge.status, load_status],
                   api_name="tune_load", queue=False)
    clicked = front_click.box("tune-front-click")
    clicked.change(_click_handler(load, load_status, pick, clicked), [clicked, result, models.dims],
                   [*merge.apply_targets, merge.status, load_status, pick, clicked], queue=False,
                   api_visibility="private")
    front_click.wire("tune-plot", clicked, FRONT_LABEL_AT)
