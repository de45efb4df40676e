"""The "Evaluate" panel: this tab's merge (or DRIFT result) and the original VLM (or another merge or DRIFT
run of this tab: webapp.ui.compare_picker) scored side by side on the bundled suites, or on the user's own eval set (a JSONL with its images, or a zip), in the worker
(UI side). An uploaded set is gathered and checked here (webapp.ui.eval_upload, analysis.eval_file), so
a bad line is named before the worker queue is joined; the worker reads it again before scoring.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from analysis import intervals
from analysis.eval_file import check_items
from analysis.evaluate import SUITES
from merging.errors import LabError
from merging.layout import ROLES
from webapp.protocol import EVAL_MAX_LIMIT as MAX_LIMIT
from webapp.protocol import triple_of
from webapp.safety import open_image
from webapp.ui import cancel_button, eval_upload
from webapp.ui.lab import Lab, follow_status, session_of
from webapp.ui.models_panel import ModelsPanel
from webapp.ui.variants import variant_label

DEFAULT_LIMIT = 20
ABOUT = ("Score **this tab's merge** and **the original VLM** (or another merge or DRIFT run of this tab: pick it in "
         "*compare with*) on the same items: the bundled toy suites, or your own. Merge first (2 · Merge) to "
         "compare; without a merge only the second model is scored.")
OWN_HELP = """One JSON object a line: `{"question": "how many circles ?", "answer": "3", "image": "images/a.png"}`
(`image` and `id` optional; the image path is relative to the JSONL). Upload the `.jsonl` with its images
(matched by file name), or one `.zip` holding the JSONL and its folders. A bad line is named with its number."""
NO_MERGE = "_No merge in this tab yet: only the original VLM was scored. Press **Merge** to compare._"


SCORE_COLUMNS = ["suite", "original VLM", "merged", "difference (points)"]
INTERVALS = ("Accuracy in %, [95% Wilson interval]; difference: the merge minus the model it is compared with, on the "
             "same items, "
             "[95% paired bootstrap interval, 2000 resamples]. **within noise**: that interval holds 0, so these "
             "items do not tell the two models apart.")
DISAGREE_COLUMNS = ["line", "question", "answer", "original VLM", "merged"]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _bits(outcomes: str) -> list[bool]:
    return [c == "1" for c in outcomes]


def _acc_cell(x: float | None, outcomes: str | None) -> str:
    """'80.0% [58.4, 91.9] (n 20)' or, without the items' outcomes, the accuracy alone."""
    if x is None or not outcomes:
        return _pct(x)
    return f"{intervals.fmt_acc(intervals.accuracy(_bits(outcomes)), percent=True)} (n {len(outcomes)})"


def _diff_cell(o: float, m: float | None, a: str | None, b: str | None) -> str:
    if m is None:
        return "—"
    if not a or not b or len(a) != len(b):
        return f"{100 * (m - o):+.1f}"
    return intervals.fmt_diff(intervals.paired_difference(_bits(a), _bits(b)))


def score_table(acc: dict, merged_label: str | None, correct: dict | None = None,
                other_label: str | None = None) -> pd.DataFrame:
    """suite | original VLM (or `other_label`, the model compared with) | merged | difference (points), each
    with its 95% interval when `correct` (each item's outcome, "0110...", per model and suite) is given."""
    orig, merged = acc["original"], acc.get("merged")
    co, cm = (correct or {}).get("original", {}), (correct or {}).get("merged", {})
    rows = []
    for s, o in orig.items():
        m = merged.get(s) if merged else None
        rows.append([s, _acc_cell(o, co.get(s)), _acc_cell(m, cm.get(s)), _diff_cell(o, m, co.get(s), cm.get(s))])
    head = f"merged: {merged_label}" if merged_label else "merged (none yet)"
    second = f"compared: {other_label}" if other_label else SCORE_COLUMNS[1]
    return pd.DataFrame(rows, columns=[SCORE_COLUMNS[0], second, head, SCORE_COLUMNS[3]])


def disagreement_views(found: list[dict], other_label: str | None = None) -> tuple[pd.DataFrame, list]:
    """The disagreements as a table (every one) and a gallery (those with an image, captioned)."""
    def mark(answer, ok):
        return f"{answer} {'✓' if ok else '✗'}"

    rows = [[d["line"], d["question"], d["answer"], mark(d["original"], d["original_correct"]),
             mark(d["merged"], d["merged_correct"])] for d in found]
    columns = [*DISAGREE_COLUMNS[:3], other_label or DISAGREE_COLUMNS[3], DISAGREE_COLUMNS[4]]
    table = pd.DataFrame(rows, columns=columns)
    # short captions: a thumbnail shows one line; the table above has the questions. Each image decoded
    # now: the staged upload it lies in is removed once scored, before the browser would fetch it
    gallery = [(open_image(d["image"]), f"line {d['line']}: {mark(d['original'], d['original_correct'])} → "
                f"{mark(d['merged'], d['merged_correct'])}") for d in found if d["image"]]
    return table, gallery


def gallery_label(other_label: str | None) -> str:
    """The gallery's caption key, naming what the merge is compared with (the VLM unless another is picked)."""
    return f"those items with their image (line: {other_label or 'the VLM'}'s answer → this merge's)"


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([], columns=columns)


def _triple(lab: Lab, variant, preset, vlm, reasoner, base) -> dict:
    return dict(zip(ROLES, triple_of(variant))) if variant else lab.triple(preset, vlm, reasoner, base)


def _run(lab: Lab, args: dict, request, verb: str):
    """Yield (status, None) while the job runs, then (status, payload or None) once it ends."""
    job = lab.client.submit("evaluate", args, session_of(request))
    for text, end in follow_status(lab.client, job, verb):
        if end is None:
            yield text, None
            continue
        ev, payload, el = end
        if ev == "result":
            yield f"✓ Done in {el:.1f} s on the worker.", payload
        else:
            yield f"{'■' if ev == 'cancelled' else '✗'} {payload}", None


def _suites_handler(lab: Lab):
    def evaluate(variant, other, preset, vlm, reasoner, base, suites, limit, request: gr.Request = None):
        """Score this tab's merge and the model it is compared with on the bundled suites."""
        try:
            if limit is None or not 1 <= limit <= MAX_LIMIT:
                raise LabError(f"items per suite: enter a whole number from 1 to {MAX_LIMIT}")
            if not suites:
                raise LabError("choose at least one suite")
            args = {"triple": _triple(lab, variant, preset, vlm, reasoner, base), "recipe": variant,
                    "compare": other, "suites": list(suites), "limit": int(limit)}
        except LabError as e:
            yield f"✗ {e}", gr.skip()
            return
        label = variant_label(variant)
        for text, payload in _run(lab, args, request, "Evaluating"):
            if payload is None:
                yield text, gr.skip()
                continue
            note = "" if variant else f"\n\n{NO_MERGE}"
            only = "" if variant else f", {variant_label(other) or 'the original VLM'} only"
            yield (f"{text} {int(limit)} items per suite{only}.{note}",
                   score_table(payload["accuracy"], label, payload.get("correct"), variant_label(other)))

    return evaluate


def _own_args(lab: Lab, files, variant, other, preset, vlm, reasoner, base) -> tuple[dict, int]:
    """The worker job's arguments for an uploaded set, and its item count; LabError for a bad upload."""
    paths = [f if isinstance(f, str) else getattr(f, "name", None) or f.get("path") for f in (files or [])]
    upload_dir = Path(lab.read_roots[0])
    upload_dir.mkdir(parents=True, exist_ok=True)
    es = eval_upload.stage([p for p in paths if p], lab.read_roots, upload_dir)
    try:
        items = check_items(es.jsonl, es.by_name, es.name)
    except BaseException:  # a refused set leaves nothing staged
        eval_upload.unstage(upload_dir, es.jsonl)
        raise
    args = {"triple": _triple(lab, variant, preset, vlm, reasoner, base), "recipe": variant, "compare": other,
            "suite_file": str(es.jsonl), "by_name": es.by_name, "name": es.name}
    return args, len(items)


def _own_handler(lab: Lab):
    def evaluate_own(files, variant, other, preset, vlm, reasoner, base, request: gr.Request = None):
        """Score both models on an uploaded eval set; list the items where their answers differ."""
        keep = (gr.skip(),) * 3
        try:
            args, n = _own_args(lab, files, variant, other, preset, vlm, reasoner, base)
        except LabError as e:  # no results of an earlier set under this set's refusal
            yield f"✗ {e}", _empty(SCORE_COLUMNS), _empty(DISAGREE_COLUMNS), None
            return
        try:
            for text, payload in _run(lab, args, request, f"Evaluating your {n} items"):
                if payload is None:
                    yield (text, *keep)
                    continue
                acc = score_table(payload["accuracy"], variant_label(variant), payload.get("correct"),
                                  variant_label(other))
                if "disagree" not in payload:
                    yield (f"{text} {n} items.\n\n{NO_MERGE}", acc, _empty(DISAGREE_COLUMNS), None)
                    continue
                table, gallery = disagreement_views(payload["disagree"], variant_label(other))
                total = payload["disagree_total"]
                shown = f" (the first {len(payload['disagree'])} listed)" if total > len(payload["disagree"]) else ""
                yield (f"{text} {n} items; the two models' final answers differ on **{total}**{shown}.", acc, table,
                       gr.update(value=gallery, label=gallery_label(variant_label(other))))
        finally:  # scored (or refused, or cancelled): the unpacked set goes
            eval_upload.unstage(Path(lab.read_roots[0]), args["suite_file"])

    return evaluate_own


def _own_section(lab: Lab, base_inputs: list) -> None:
    """Bring your own eval set: the upload, its button, the scores, the disagreements and their images."""
    gr.Markdown(OWN_HELP)
    files = gr.File(file_count="multiple", file_types=[".jsonl", ".json", ".zip", "image"], type="filepath",
                    label="your .jsonl and its images, or one .zip", elem_id="eval-files", height=220)
    with gr.Row():
        own_btn = gr.Button("Evaluate my set", variant="primary", elem_id="eval-own-btn", scale=0, min_width=200)
        own_cancel = gr.Button("Cancel", variant="stop", elem_id="eval-own-cancel", scale=0, min_width=100)
    own_status = gr.Markdown(elem_id="status-eval-own")
    own_table = gr.Dataframe(_empty(SCORE_COLUMNS), label="accuracy on your set", interactive=False,
                             elem_id="eval-own-table", wrap=True, column_widths=["13%", "26%", "26%", "35%"])
    disagree = gr.Dataframe(_empty(DISAGREE_COLUMNS), label="where the two models answer differently",
                            interactive=False, wrap=True, elem_id="eval-disagree", max_height=360,
                            column_widths=["8%", "50%", "12%", "15%", "15%"])
    gallery = gr.Gallery(label=gallery_label(None), columns=4, height="auto", elem_id="eval-gallery",
                         object_fit="contain")
    own_btn.click(_own_handler(lab), [files, *base_inputs], [own_status, own_table, disagree, gallery],
                  api_name="evaluate_own", concurrency_limit=16)
    cancel_button.wire(lab, own_cancel, ("evaluate",))


def build(lab: Lab, models: ModelsPanel, variant_state: gr.State, comparison) -> None:
    """The panel; `comparison` (a compare_picker.Comparison) holds the model the merge is scored against."""
    with gr.Row(equal_height=True):
        gr.Markdown(ABOUT)
        comparison.picker("eval-compare")
    with gr.Row():
        suites = gr.CheckboxGroup(list(SUITES), value=list(SUITES), label="suites", elem_id="eval-suites", scale=3)
        limit = gr.Number(DEFAULT_LIMIT, label="items per suite", precision=0, info=f"1 to {MAX_LIMIT}",
                          elem_id="eval-limit", scale=1, min_width=160)
    with gr.Row():
        run_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn", scale=0, min_width=160)
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="eval-cancel", scale=0, min_width=100)
    status = gr.Markdown(elem_id="status-evaluate")
    table = gr.Dataframe(_empty(SCORE_COLUMNS), label="accuracy, per suite", interactive=False,
                         elem_id="eval-table", wrap=True, column_widths=["13%", "26%", "26%", "35%"])
    gr.Markdown(INTERVALS, elem_id="eval-intervals-note")
    base_inputs = [variant_state, comparison.other, *models.inputs]
    run_btn.click(_suites_handler(lab), [*base_inputs, suites, limit], [status, table], api_name="evaluate",
                  concurrency_limit=16)
    cancel_button.wire(lab, cancel_btn, ("evaluate",))
    with gr.Accordion("Bring your own eval set", open=True, elem_id="eval-own"):
        _own_section(lab, base_inputs)
