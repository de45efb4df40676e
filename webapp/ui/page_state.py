"""The lab's state on the page: a link's query string (or a walkthrough step) applied to the
controls, and the address bar kept in step with them (UI side; the format: webapp.ui.url_state)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import gradio as gr

from webapp import presets
from webapp.ui import models_panel, url_state
from webapp.ui.lab import Lab
from webapp.ui.merge_panel import MergePanel
from webapp.ui.models_panel import ModelsPanel
from webapp.ui.walkthrough import STEPS


@dataclass
class PageTabs:
    main: gr.Tabs
    chat: gr.Tab  # id "tab-chat"
    analysis: gr.Tab  # id "tab-analysis", holding one sub-tab per analysis
    drift: gr.Accordion
    pages: dict[str, gr.Tab]  # the other main tabs by url_state.PAGES name (ids "tab-<name>")

    def analysis_tabs(self) -> tuple[gr.Tabs, dict[str, gr.Tab]]:
        """The analysis panel's own Tabs and its tabs by analysis name (ids "an-<name>")."""
        stack, tabs, found = list(self.analysis.children), None, {}
        while stack:
            b = stack.pop()
            if isinstance(b, gr.Tabs) and tabs is None:
                tabs = b
            if isinstance(b, gr.Tab) and str(b.id).startswith("an-"):
                found[str(b.id)[3:]] = b
            stack += getattr(b, "children", [])
        return tabs, found


def _notes_markdown(notes: list[str]) -> str:
    if not notes:
        return ""
    return ("⚠ **Some of the link's settings could not be used as given:**\n\n"
            + "\n".join(f"- {n}" for n in notes))


def _triple_query(preset, vlm, reasoner, base) -> dict:
    """The current triple as url_state query keys, so applying a state keeps it."""
    if preset == presets.CUSTOM:
        return {"vlm": vlm, "reasoner": reasoner, "base": base}
    return {"preset": url_state.slug(preset)} if preset != presets.DEFAULT else {}


def _track_tabs(tabs: PageTabs, an_tab: dict, tab_box, an_box) -> None:
    """Keep the hidden `tab` box (the URL's tab) in step with what the user opens, in the browser."""
    # tab "drift": the chat tab with the DRIFT panel open (selecting a tab, even from apply_query, fires select)
    tabs.chat.select(None, tab_box, tab_box, js="(t) => t === 'drift' ? t : 'chat'")
    tabs.drift.expand(None, tab_box, tab_box, js="(t) => t === 'chat' ? 'drift' : t")
    tabs.drift.collapse(None, tab_box, tab_box, js="(t) => t === 'drift' ? 'chat' : t")
    tabs.analysis.select(None, an_box, tab_box, js="(a) => a || 'similarity'")
    for name, tab in an_tab.items():
        tab.select(None, None, [an_box, tab_box], js=f"() => [{name!r}, {name!r}]")
    for name, tab in tabs.pages.items():
        tab.select(None, None, tab_box, js=f"() => {name!r}")


def wire(demo: gr.Blocks, lab: Lab, models: ModelsPanel, merge: MergePanel, tabs: PageTabs,
         message: gr.Markdown, step_buttons: list, use_beta: tuple | None = None) -> None:
    """Restore a link's state when the page loads, apply walkthrough steps, and keep the URL current."""
    an_tabs, an_tab = tabs.analysis_tabs()
    tab_box = gr.Textbox("chat", visible="hidden", elem_id="lab-tab")  # the open view, as the URL's `tab`
    an_box = gr.Textbox("similarity", visible="hidden", elem_id="lab-analysis-tab")  # the last analysis sub-tab
    on_check, _, model_outs = models.load_event

    def apply_query(query: Mapping, keep_view: bool = False) -> dict:
        """The updates that show the state `query` asks for, with a message naming what was not used."""
        state, notes = url_state.parse(query, lab.models_root)
        checked = on_check(state.preset, state.vlm, state.reasoner, state.base)
        dims = checked[list(model_outs).index(models.dims)]
        state, more = url_state.fit(state, dims)
        ups = dict(zip(model_outs, checked))
        ups[models.preset] = state.preset
        if state.preset == presets.CUSTOM:
            ups.update({models.vlm: state.vlm, models.reasoner: state.reasoner, models.base: state.base})
        ups.update(merge.apply(state, dims))
        analysis = state.tab if state.tab in an_tab else None
        main = "analysis" if analysis else state.tab if state.tab in tabs.pages else "chat"
        ups[tabs.main] = gr.Tabs(selected=f"tab-{main}")
        if analysis:
            ups[an_tabs] = gr.Tabs(selected=f"an-{analysis}")
            ups[an_box] = analysis
        ups[tabs.drift] = gr.Accordion(open=state.tab == "drift")
        ups[tab_box] = state.tab
        ups[message] = _notes_markdown(notes + more)
        if keep_view:  # re-selecting the open tab re-mounts its plots blank: leave the view alone
            for t in (tabs.main, an_tabs, tabs.drift, tab_box, an_box, *model_outs, models.preset, models.vlm,
                      models.reasoner, models.base, message):  # the triple is unchanged too
                ups[t] = gr.skip()
        return ups

    outputs = [*model_outs, models.preset, models.vlm, models.reasoner, models.base, *merge.apply_targets,
               tabs.main, an_tabs, tabs.drift, tab_box, an_box, message]
    url_inputs = [models.preset, models.vlm, models.reasoner, models.base, merge.method, merge.prior, merge.first,
                  merge.last, merge.layers_n, tab_box, merge.advanced, *merge.knobs]
    encoder = url_state.encoder_js()

    def restore(request: gr.Request):
        return apply_query(dict(request.query_params) if request is not None else {})

    loaded = demo.load(restore, None, outputs, api_visibility="private")
    loaded.then(None, url_inputs, None, js=encoder)
    loaded.then(lambda *a: models_panel.plan_markdown(lab, *a), models.inputs, models.plan, api_visibility="private")
    for button, step in zip(step_buttons, STEPS):
        button.click(lambda q=step.query: apply_query(q), None, outputs, queue=False,
                     api_visibility="private").then(None, url_inputs, None, js=encoder)

    if use_beta is not None:  # the attention fit's beta into frank's knobs, prior on, the fit still in view
        beta, button = use_beta
        button.click(lambda b, p, v, r, bs: apply_query({**url_state.beta_query(b), **_triple_query(p, v, r, bs)},
                                                        keep_view=True),
                     [beta, models.preset, models.vlm, models.reasoner, models.base], outputs, queue=False,
                     api_visibility="private").then(None, url_inputs, None, js=encoder)
    gr.on([c.change for c in url_inputs], None, url_inputs, None, js=encoder)
    _track_tabs(tabs, an_tab, tab_box, an_box)
