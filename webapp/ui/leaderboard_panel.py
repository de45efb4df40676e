"""The "Leaderboard" panel: every merge method ranked with dev-tuned knobs on the bundled family, as
`python -m analysis leaderboard` does, computed in the worker and cached; one row's recipe can be
loaded into the merge panel (UI side).

A row is loaded the way a link's state is: its method and knobs become a url_state query, parsed
and fitted to the model (url_state.parse / fit), and shown by MergePanel.apply, the setter the URL
restore and the walkthrough use.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from analysis import leaderboard
from analysis.evaluate import SUITES
from analysis.knob_figures import describe
from merging import methods
from merging.errors import LabError
from webapp import presets
from webapp.protocol import LEADERBOARD_LIMITS as LIMITS
from webapp.ui import cancel_button, plot_export, shipped
from webapp.ui.knobs_loader import knobs_into_merge
from webapp.ui.lab import Lab, follow_result, session_of
from webapp.ui.merge_panel import MergePanel
from webapp.ui.models_panel import ModelsPanel

ABOUT = ("Every merge method on the bundled toy family: its defaults, and its best knobs from a small grid "
         "chosen on a **dev split** (disjoint from the eval suites), both scored on the held-out suites. "
         "The same run as `python -m analysis leaderboard`; results are cached, so the same numbers load at once, "
         "and the bundled family's at the starting values are shipped precomputed.")
TOY_ONLY = ("_The leaderboard runs on the bundled toy family only (its dev split is generated from the toy tasks): "
            "pick **Toy family** in 1 · Models to run it._")
FIELDS = {"limit": "held-out items per suite", "dev_items": "dev items per suite",
          "grid_size": "grid points per method"}


COLUMNS = ["method", "setting (and what the merge selected)", "perception", "visual math", "text math",
           "Δ perception", "Δ visual math"]
WIDTHS = ["12%", "22%", "11%", "11%", "11%", "17%", "16%"]


def _knobs_text(knobs: dict) -> str:
    return describe(knobs)  # a tuned row's per-layer schedule as start -> end


def table(result: dict) -> pd.DataFrame:
    """One row per entry: the held-out accuracies (± half their 95% Wilson interval) and their change
    from the VLM in points, with its 95% paired bootstrap interval ("noise" where it holds 0)."""
    vlm = next(e for e in result["entries"] if e["method"] == "vlm")["test"]
    rows = []
    for e in result["entries"]:
        cells = [leaderboard.cell(e, s) if s in e["test"] else "—" for s in SUITES]
        deltas = [leaderboard.delta(e, s, vlm) if s in e["test"] and e["method"] != "vlm" else "—"
                  for s in ("perception", "visual_math")]
        setting = e["label"] + (f": {_knobs_text(e['knobs'])}" if e["knobs"] else "")
        setting += f" · {e['details']}" if e.get("details") else ""
        rows.append([e["method"], setting, *cells, *deltas])
    return pd.DataFrame(rows, columns=COLUMNS)


def row_choices(result: dict) -> list[tuple[str, int]]:
    """(shown, index into entries) of every row that is a merge (not the VLM or the reasoner)."""
    return [(f"{e['method']} · {e['label']}" + (f" ({_knobs_text(e['knobs'])})" if e["knobs"] else ""), i)
            for i, e in enumerate(result["entries"]) if e["method"] in methods.names()]


def _args(preset, limit, dev_items, grid_size, chosen) -> dict:
    if preset != presets.DEFAULT:
        raise LabError(TOY_ONLY.strip("_").replace("**", ""))
    args = {"methods": list(chosen or [])}
    if not args["methods"]:
        raise LabError("choose at least one method")
    for name, v in (("limit", limit), ("dev_items", dev_items), ("grid_size", grid_size)):
        lo, hi, _ = LIMITS[name]
        if v is None or not lo <= v <= hi or not float(v).is_integer():
            raise LabError(f"{FIELDS[name]}: enter a whole number from {lo} to {hi}")
        args[name] = int(v)
    return args


def _shown(result: dict) -> tuple:
    """The plot, table, row choices and state of a result."""
    return leaderboard.scatter(result), table(result), gr.update(choices=row_choices(result), value=None), result


def _run_handler(lab: Lab):
    def run(preset, limit, dev_items, grid_size, chosen, live=False, request: gr.Request = None):
        """Rank the chosen methods on the toy family (dev-tuned knobs, held-out scores); the shipped
        result when these are its settings, unless `live`."""
        keep = (gr.skip(),) * 4
        try:
            args = _args(preset, limit, dev_items, grid_size, chosen)
        except LabError as e:
            yield (f"✗ {e}", *keep)
            return
        e = None if live else shipped.leaderboard_entry(args)
        if e is not None:
            yield (f"✓ {shipped.status(e, 'Run leaderboard')}", *_shown(e["data"]))
            return
        job = lab.client.submit("leaderboard", {**args, "live": bool(live)}, session_of(request))
        got = yield from follow_result(lab.client, job, "Ranking the methods", keep)
        if got is None:
            return
        payload, el = got
        result = payload["result"]
        if payload.get("precomputed"):
            yield (f"✓ {payload['precomputed']} ({el:.1f} s).", *_shown(result))
            return
        how = "from the cache" if payload["cached"] else "computed"
        yield (f"✓ {len(args['methods'])} method(s) ranked in {el:.1f} s ({how}; {args['limit']} held-out and "
               f"{args['dev_items']} dev items per suite, up to {args['grid_size']} grid points each).", *_shown(result))

    return run


def _load_handler(merge: MergePanel, load_status: gr.Markdown):
    def load(index, result, preset, dims):
        """Show a row's method and knobs in the merge panel (as a link with them would)."""
        if preset != presets.DEFAULT:
            return {load_status: TOY_ONLY}
        if result is None or index is None:
            return {load_status: "Run the leaderboard, then pick a row."}
        e = result["entries"][int(index)]
        what = f"{e['method']} ({e['label']}{': ' + _knobs_text(e['knobs']) if e['knobs'] else ''})"
        return knobs_into_merge(merge, dims, e["method"], e["knobs"], what, "leaderboard", load_status)

    return load


def build(lab: Lab, models: ModelsPanel, merge: MergePanel) -> None:
    gr.Markdown(ABOUT)
    note = gr.Markdown("", elem_id="lb-toy-note")
    with gr.Row():
        numbers = [gr.Number(LIMITS[k][2], label=label, precision=0, info=f"{LIMITS[k][0]} to {LIMITS[k][1]}",
                             elem_id=f"lb-{k.replace('_', '-')}", min_width=150) for k, label in FIELDS.items()]
    chosen = gr.CheckboxGroup(methods.names(), value=methods.names(), label="methods", elem_id="lb-methods")
    ship = shipped.leaderboard_default()  # the result shipped for these starting values, shown at once
    with gr.Row():
        run_btn = gr.Button("Run leaderboard", variant="primary", elem_id="lb-btn", scale=0, min_width=240)
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="lb-cancel", scale=0, min_width=100)
        live = gr.Checkbox(False, label=shipped.LIVE_LABEL, elem_id="lb-live", scale=0, min_width=300)
    status = gr.Markdown(shipped.status(ship, "Run leaderboard") if ship else "", elem_id="status-leaderboard")
    first = ship and ship["data"]
    plot = plot_export.plot(leaderboard.scatter(first) if first else None,
                            label="perception vs visual_math, held-out", elem_id="lb-plot")
    rows = gr.Dataframe(table(first) if first else pd.DataFrame([], columns=COLUMNS), label="held-out accuracy (%, ± half the 95% Wilson "
                        "interval) and change from the VLM (points, [95% paired bootstrap interval]; noise: it holds 0)", interactive=False, wrap=True, elem_id="lb-table", column_widths=WIDTHS, max_height=720)
    result = gr.State(first or None)
    pick = gr.Dropdown(row_choices(first) if first else [], value=None, label="a row's recipe (method and knobs)", elem_id="lb-row",
                       info="a row of the table above; the VLM and the reasoner are not merges")
    with gr.Row():
        load_btn = gr.Button("Load into 2 · Merge", elem_id="lb-load", scale=0, min_width=260)
    load_status = gr.Markdown(elem_id="status-lb-load")
    run_btn.click(_run_handler(lab), [models.preset, *numbers, chosen, live], [status, plot, rows, pick, result],
                  api_name="leaderboard", concurrency_limit=16)
    load_btn.click(_load_handler(merge, load_status), [pick, result, models.preset, models.dims],
                   [*merge.apply_targets, merge.status, load_status], api_name="leaderboard_load", queue=False)

    cancel_button.wire(lab, cancel_btn, ("leaderboard",))

    def toy_note(preset):
        toy = preset == presets.DEFAULT
        return "" if toy else TOY_ONLY, gr.update(interactive=toy), gr.update(interactive=toy)

    models.preset.change(toy_note, models.preset, [note, run_btn, load_btn], queue=False, api_visibility="private")
