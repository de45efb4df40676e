"""The guided walkthrough: seven steps, each one button that puts the lab in a state (in the URL's
terms, applied by page_state like a shared link) and a few sentences on what to look at (UI side)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr


@dataclass(frozen=True)
class Step:
    title: str
    query: dict  # the state, as a link's query parameters (webapp.ui.url_state); the toy family throughout
    text: str


# The steps quote what the student sees: the measured outcome under the status (webapp.ui.walk_outcome: the
# first 30 items of perception and visual_math, greedy, so the same numbers every time; from the command line,
# each step's query as a recipe on assets/toy, `python -m merging merge R OUT` (DRIFT: `python -m merging drift`
# with the panel's defaults), then `python -m analysis eval OUT --limit 30`), and the knockout tab at its 40 items.
STEPS = (
    Step("Task vectors are nearly orthogonal",
         {"method": "task_arithmetic", "alpha": "0.5", "tab": "similarity"},
         "Press **Compute** in *Why it works › Similarity*. The cosine between the VLM's task vector "
         "(VLM − base) and the reasoner's (reasoner − base) is small in every layer and module (at most 0.24, "
         "whole blocks 0.04-0.07), far from the 1 of a shared direction: the two fine-tunes moved the base in "
         "nearly orthogonal directions, so adding one disturbs little of the other (FRANK, Fig. 3). They are "
         "not unrelated, though: the strip below puts nearly every cosine outside the grey band that random "
         "task vectors of the same shapes fill, most of them above it."),
    Step("The reasoner's singular values are larger",
         {"method": "ip_merging", "rank": "32", "tab": "spectra"},
         "Press **Compute** in *Singular values*: the reasoner's task-vector spectrum lies well above the "
         "VLM's (its top singular value is 1.2-2.5 times larger here). Math fine-tuning moved the weights "
         "more, so a plain sum is dominated by the reasoner; IP-Merging rescales the reasoner's update for "
         "that reason (IP-Merging, Fig. 4)."),
    Step("Task arithmetic: the free lunch",
         {"method": "task_arithmetic", "alpha": "1", "tab": "chat"},
         "Press **Merge**, then click an example in *Chat* and compare the two sides: on \"7 circles are taken "
         "away\" the VLM only counts, while the merge counts and then subtracts, a skill no image question "
         "ever taught the VLM. Adding the whole math task vector keeps perception within the noise: under the "
         "status, on 30 items a suite, visual math 3% -> 37% (+33 points [+17, +50]) and perception 77% -> 70% "
         "(−7 [−17, 0]), the free lunch the merging papers report (on 150 items the leaderboard has +46 and −3)."),
    Step("IP-Merging: select, then project",
         {"method": "ip_merging", "top_fraction": "0.5", "rank": "32", "tab": "changes"},
         "IP-Merging merges only the matrices whose VLM and reasoner subspaces already agree; at the paper's "
         "threshold (0.4) no matrix of this family qualifies (the highest similarity is 0.33), so this step uses "
         "top_fraction 0.5, the half of each layer's matrices that agree most. Press **Merge**: the status lists the selection and the "
         "scores; the update is projected onto the VLM's top-32 singular directions, so **Compute** in "
         "*Change map* shows small, targeted changes. Its measured outcome, under the status, is no change "
         "beyond the noise (visual math 3% -> 10%, perception 77% -> 73%): an update of at most 2% "
         "of a weight's norm does not teach the VLM the reasoner's arithmetic here."),
    Step("Visual attention per layer: U-shaped here, not a decay",
         {"method": "frank", "use_prior": "1", "beta": "0.033", "tab": "attention"},
         "Press **Compute** in *Attention decay*: the share of attention that text pays to image tokens, per "
         "layer, with an exponential fit (beta). FRANK finds it decays with depth and turns the decay into a "
         "prior, w_v(l) = exp(−beta·l), so the early layers, where the image is read, keep more of the VLM "
         "(FRANK, Fig. 2). On this family it does not decay (57% at layer 0, 27% at layer 4, 52% at layer 7: "
         "the fit explains 9% of the variance, beta about 0.03), so the prior it gives is nearly flat "
         "(**Use this β for FRANK's prior** sets that 0.033, as this step did: 79-100% of the VLM in every "
         "layer), and **Merge** measures no change beyond the noise (visual math 3% -> 7%, perception "
         "77% -> 77%): the prior is only as useful as the decay it fits."),
    Step("Knockout: where perception and reasoning live, against a control",
         {"method": "task_arithmetic", "alpha": "1", "tab": "knockout"},
         "Press **Merge** (task arithmetic, alpha 1: a merge that does some visual math), then **Compute** in "
         "*Layer knockout*: each layer's attention or MLP is set to a constant and the drop in accuracy is "
         "measured on 40 items a suite, for the VLM and the merge, with 95% intervals, and on text_math, which "
         "has no image: the control. Early attention layers cost perception, but they cost the control as much "
         "or more (the VLM's layer 1: perception drops 15 points, text_math 82), so BR2V's \"perception early\" "
         "is not shown here: those layers are needed for any answer. The merge's visual math needs the last "
         "layer's attention (a drop of 22) while its perception and text math do not (0 and 8, noise), BR2V's "
         "\"reasoning late\" in part, and knocking out layer 4's attention *raises* the merge's visual math (a "
         "drop of −30, drawn below 0): without it the merge takes the question's number and verb right more "
         "often, so this merge puts something harmful there."),
    Step("DRIFT: fine-tune toward the reasoner instead",
         {"method": "task_arithmetic", "alpha": "1", "tab": "drift"},
         "Instead of merging, DRIFT fine-tunes the VLM for a few steps with each gradient steered toward the "
         "reasoner (D = W_reasoner − W_vlm): press **Run DRIFT** in the opened panel (alpha 0 is a plain "
         "fine-tune; its 60 steps take about a minute on a CPU), then ask the example math question in *Chat*. "
         "Its measured outcome: visual math 3% -> 100%, but perception 77% -> 7%, as it trains "
         "on visual math only and answers every question as arithmetic (with a quarter of perception examples "
         "replayed, the README shows the plain fine-tune keeping perception and DRIFT not). Then press "
         "**Merge**: task arithmetic alpha 1 (step 3's merge) keeps perception (70%, within noise of the VLM) "
         "with visual math at 37%, while linear alpha 1, the reasoner's language model swapped in whole, falls "
         "to 53% (−23 points, a measured loss)."),
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
