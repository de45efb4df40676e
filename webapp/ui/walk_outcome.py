"""A walkthrough step's measured outcome: once the merge or DRIFT run a step asked for is done, the
original VLM and it are scored on a small sample in the worker (webapp.worker.outcome_jobs) and the
result is shown under the status the student is looking at (UI side).

Only while a walkthrough step is the last thing applied: the sample is the toy family's suites,
which mean nothing for another triple; picking another triple than the steps' leaves the walkthrough.
"""

from __future__ import annotations

import gradio as gr

from analysis.intervals import fmt_acc
from merging.layout import ROLES
from webapp import presets
from webapp.protocol import DriftRun, triple_of
from webapp.ui.lab import Lab, follow_status, session_of
from webapp.ui.variants import variant_label

SUITE_NAMES = {"perception": "perception (what is in the image)", "visual_math": "visual math (compute on it)"}


def outcome_markdown(payload: dict, label: str) -> str:
    """The scores as a short list: each model's accuracy [95% interval] and the difference, noise named."""
    lines = []
    for suite, r in payload["suites"].items():
        d = r["diff"]
        verdict = ("within noise: no measured change" if d["noise"] else
                   "a measured gain" if d["diff"] > 0 else "a measured loss")
        lines.append(f"- {SUITE_NAMES.get(suite, suite)}: the VLM {fmt_acc(r['original'], percent=True)} → "
                     f"{fmt_acc(r['merged'], percent=True)}; difference {100 * d['diff']:+.1f} points "
                     f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]: **{verdict}**")
    return (f"**Measured outcome** of {label} against the original VLM, on the first {payload['items']} items "
            "of each image suite (accuracy [95% interval]; the difference's interval is paired):\n\n"
            + "\n".join(lines))


def _handler(lab: Lab):
    def measure(variant, step, request: gr.Request = None):
        """(merge panel's outcome line, DRIFT panel's outcome line) for the variant now live."""
        if not variant or not step:
            yield "", ""
            return
        drift = isinstance(variant, DriftRun)

        def show(text):
            return ("", text) if drift else (text, "")

        args = {"triple": dict(zip(ROLES, triple_of(variant))), "recipe": variant}
        job = lab.client.submit("outcome", args, session_of(request))
        for text, end in follow_status(lab.client, job, f"Measuring {variant_label(variant)} on a small sample"):
            if end is None:
                yield show(text)
            elif end[0] == "result":
                yield show(outcome_markdown(end[1], variant_label(variant)))
            else:
                yield show(f"Outcome not measured ({end[0]}: {end[1]}).")

    return measure


def wire(lab: Lab, step_buttons: list, preset: gr.Dropdown, variant_state: gr.State, merge_outcome: gr.Markdown,
         drift_outcome: gr.Markdown) -> gr.State:
    """Remember the last step applied (until another triple than the walkthrough's is picked), and
    measure each merge or DRIFT run made while it is."""
    step = gr.State(None)
    for i, button in enumerate(step_buttons, 1):
        button.click(lambda i=i: i, None, step, queue=False, api_visibility="private")
    preset.input(lambda p: gr.skip() if p == presets.DEFAULT else None, preset, step, queue=False,
                 api_visibility="private")
    # always_last: a change while an outcome is being measured (another merge, another triple) runs once that
    # measure ends, so the line always ends describing what is live, never the measure of a model gone
    variant_state.change(_handler(lab), [variant_state, step], [merge_outcome, drift_outcome],
                         api_visibility="private", concurrency_limit=16, trigger_mode="always_last")
    return step

