"""The guided walkthrough: seven steps, each one button that puts the lab in a state (in the URL's
terms, applied by page_state like a shared link) and a few sentences on what to look at (UI side)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr


@dataclass(frozen=True)
class Step:
    title: str
    query: dict  # the state, as a link's query parameters (webapp.url_state); the toy family throughout
    text: str


STEPS = (
    Step("Task vectors are nearly orthogonal",
         {"method": "task_arithmetic", "alpha": "0.5", "tab": "similarity"},
         "Press **Compute** in *Why it works › Similarity*. The cosine between the VLM's task vector "
         "(VLM − base) and the reasoner's (reasoner − base) stays near 0 in every layer and module: the two "
         "fine-tunes moved the shared base in almost unrelated directions, so adding one disturbs little of "
         "the other (FRANK, Fig. 3; reproduced on this family)."),
    Step("The reasoner's singular values are larger",
         {"method": "ip_merging", "rank": "32", "tab": "spectra"},
         "Press **Compute** in *Singular values*: the reasoner's task-vector spectrum lies well above the "
         "VLM's (its top singular value is several times larger here). Math fine-tuning moved the weights "
         "more, so a plain sum is dominated by the reasoner; IP-Merging rescales the reasoner's update for "
         "that reason (IP-Merging, Fig. 4)."),
    Step("Task arithmetic: reasoning in, perception out",
         {"method": "task_arithmetic", "alpha": "1", "tab": "chat"},
         "Press **Merge**, then click an example in *Chat* and compare the two sides, on a counting question "
         "about an image and on a math one. Adding the whole math task vector (alpha 1) brings in arithmetic "
         "but costs perception (the README's leaderboard: perception falls already at alpha 0.5), the "
         "trade-off the merging papers set out to avoid."),
    Step("IP-Merging: select, then project",
         {"method": "ip_merging", "top_fraction": "0.5", "rank": "32", "tab": "changes"},
         "IP-Merging merges only the matrices whose VLM and reasoner subspaces already agree; at the paper's "
         "threshold (0.4) no matrix of this family qualifies, so this step uses top_fraction 0.5, the half of "
         "each layer's matrices that agree most. Press **Merge**: the status lists the selection and the "
         "scores; the update is projected onto the VLM's top-32 singular directions, so **Compute** in "
         "*Change map* shows small, targeted changes."),
    Step("Attention decays with depth: FRANK's prior",
         {"method": "frank", "use_prior": "1", "beta": "0.1", "tab": "attention"},
         "Press **Compute** in *Attention decay*: the share of attention that text pays to image tokens, per "
         "layer, with an exponential fit (beta). FRANK turns the decay into a prior, w_v(l) = exp(−beta·l), "
         "so the early layers, where the image is read, keep more of the VLM (FRANK, Fig. 2); on this "
         "4-layer family the curve is flat (beta near 0), so put the fitted beta in the slider and **Merge**."),
    Step("Knockout: where perception and reasoning live",
         {"method": "task_arithmetic", "alpha": "1", "tab": "knockout"},
         "Press **Merge** (task arithmetic, alpha 1: a merge that does some visual math), then **Compute** in "
         "*Layer knockout*: each layer's attention or MLP is replaced by a constant and the accuracy drop is "
         "measured, for the VLM and the merge. Perception drops most when early layers are knocked out "
         "(BR2V's finding, reproduced); BR2V places reasoning in the late layers, which this small family "
         "does not reproduce."),
    Step("DRIFT: fine-tune toward the reasoner instead",
         {"method": "linear", "alpha": "1", "tab": "drift"},
         "Instead of merging, DRIFT fine-tunes the VLM for a few steps with each gradient steered toward the "
         "reasoner (D = W_reasoner − W_vlm). Press **Run DRIFT** in the opened panel (alpha 0 is a plain "
         "fine-tune), then ask the example math question in *Chat*; **Merge** compares linear alpha 1, the "
         "README's best merge for visual math. There, with the same data and steps, DRIFT reaches far higher "
         "visual math than both, but forgets perception."),
)


def build() -> list[gr.Button]:
    """The steps, one row each (inside the caller's accordion); their buttons, in order."""
    gr.Markdown("Each button sets the merge controls and opens the view to look at; then press the button "
                "the step names. The page's address always describes the lab's state: copy it to share.")
    buttons = []
    for i, step in enumerate(STEPS, 1):
        with gr.Row(equal_height=True):
            buttons.append(gr.Button(f"{i} · {step.title}", elem_id=f"walk-{i}", scale=0, min_width=260,
                                     size="sm"))
            gr.Markdown(step.text, elem_id=f"walk-text-{i}")
    return buttons
