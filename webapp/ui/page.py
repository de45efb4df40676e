"""The page: title, the walkthrough, models + merge controls on the left, chat and analyses on the right (UI side)."""

from __future__ import annotations

import gradio as gr

from webapp.ui import (
    analysis_panel,
    chat_panel,
    compare_picker,
    drift_panel,
    evaluate_panel,
    leaderboard_panel,
    merge_panel,
    models_panel,
    page_state,
    tune_panel,
    walk_outcome,
    walkthrough,
)
from webapp.ui.lab import Lab

TITLE = "Merge lab"
INTRO = ("Give a vision-language model the math skills of a reasoning LLM by **merging their weights**, "
         "no training. Pick three models, merge, chat with the result, and see *why* it works.")
CSS = """
#lab-title h1 {margin-bottom: 0.1em;}
#lab-intro p {font-size: 1.05em; margin-top: 0;}
#merge-status p, [id^=status-] p {font-size: 0.95em;}
footer {display: none !important;}
/* the chat panes' titles sit above the conversation, not floating over text scrolled beneath them */
#chat-merged > .wrapper > label[data-testid=block-label], #chat-original > .wrapper > label[data-testid=block-label] {
  position: static; margin: 0 0 6px 0; max-width: calc(100% - 96px);}
#chat-merged > .wrapper > .bubble-wrap, #chat-original > .wrapper > .bubble-wrap {border-top: 1px solid var(--border-color-primary);}
/* a plot starts below its block label, so plotly's toolbar (top right of the figure) covers neither */
.js-plotly-plot {padding-top: 30px;}
/* the toy's 48 px images: never enlarged past their size and blurred, never cropped */
#eval-gallery img {object-fit: scale-down !important; image-rendering: pixelated;}
"""


def theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="amber",
                          font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"])


def build(lab: Lab) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}", elem_id="lab-title")  # no emoji: boxes without an emoji font
        gr.Markdown(INTRO, elem_id="lab-intro")
        with gr.Accordion("Walkthrough: the papers' findings in seven steps", open=False, elem_id="walkthrough"):
            steps = walkthrough.build()
        message = gr.Markdown(elem_id="state-message")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                gr.Markdown("### 1 · Models")
                models = models_panel.build(lab)
                gr.Markdown("### 2 · Merge")
                merge = merge_panel.build(lab, models)
                with gr.Accordion("2b · DRIFT fine-tune (instead of merging)", open=False,
                                  elem_id="drift-panel") as drift:
                    _, drift_outcome = drift_panel.build(lab, models, merge.variant_state)
                device = gr.Markdown(elem_id="device-line")
            comparison = compare_picker.build(merge.variant_state)  # what the merge is set beside
            with gr.Column(scale=9), gr.Tabs() as main_tabs:
                with gr.Tab("3 · Chat", id="tab-chat") as chat_tab:
                    chat_panel.build(lab, models, merge.variant_state, comparison)
                with gr.Tab("4 · Why it works", id="tab-analysis") as analysis_tab:
                    use_beta = analysis_panel.build(lab, models, merge.recipe_state)
                with gr.Tab("5 · Evaluate", id="tab-evaluate") as evaluate_tab:
                    evaluate_panel.build(lab, models, merge.variant_state, comparison)
                with gr.Tab("6 · Leaderboard", id="tab-leaderboard") as leaderboard_tab:
                    leaderboard_panel.build(lab, models, merge)
                with gr.Tab("7 · Sweep & tune", id="tab-tune"):
                    tune_panel.build(lab, models, merge)
        # the models' first check, a link's state (?method=...) and the walkthrough's steps
        page_state.wire(demo, lab, models, merge, page_state.PageTabs(
                            main_tabs, chat_tab, analysis_tab, drift,
                            {"evaluate": evaluate_tab, "leaderboard": leaderboard_tab}),
                        message, steps, use_beta)
        walk_outcome.wire(lab, steps, models.preset, merge.variant_state, merge.outcome, drift_outcome)
        comparison.wire(lab, models)

        def device_line():
            info = lab.client.wait_ready(60)
            if info.get("state") == "ready":
                return f"<small>Worker: process {info.get('pid')} on **{info.get('device')}**</small>"
            return f"<small>Worker: {info.get('message', 'starting…')}</small>"

        demo.load(device_line, None, device, api_visibility="private")
    return demo
