"""A panel's Cancel button (UI side): stops this session's running jobs of the panel's kinds.

It writes nothing into the panel's status: the running handler says "Cancelling…" at once
(lab.follow_status) and then the outcome, so a job that ends just as Cancel is pressed keeps its
result line instead of a stale "Cancelling…". API callers get a one-line answer; the page gets a
toast when nothing was running.
"""

from __future__ import annotations

import gradio as gr

from webapp.ui.lab import Lab, session_of

CANCELLING = "■ Cancelling…"
NOTHING = "Nothing is running."


def wire(lab: Lab, button: gr.Button, kinds: tuple[str, ...], api_name: str | None = None) -> None:
    answer = gr.Textbox(visible=False)  # the API's return value, never shown

    def cancel(request: gr.Request = None) -> str:
        if lab.client.cancel_session(session_of(request), kinds):
            return CANCELLING
        gr.Info(NOTHING)
        return NOTHING

    visibility = {"api_name": api_name} if api_name else {"api_visibility": "private"}
    button.click(cancel, None, answer, queue=False, **visibility)
