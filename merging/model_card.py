"""The README.md a merged folder carries: Hugging Face front matter, sources, knobs, settings, the
mergekit translation and the lmms-eval hand-off (merging.handoff), and the merge's notes."""

from __future__ import annotations

from merging import handoff


def model_card(recipe, method, report, notes: list[str], seconds: float) -> str:
    """README.md of the merged folder: Hugging Face front matter (the VLM and the reasoner as base
    models of a merge), sources, knobs and settings, the recipe in mergekit's format where mergekit
    has the method, and how to benchmark the folder with lmms-eval."""
    knobs = recipe.knobs()
    lines = [handoff.front_matter(report.refs, method.name), f"# Merged with `{method.name}`", "",
             f"{method.description}", "", "## Sources", "",
             "| role | model | fingerprint |", "|---|---|---|"]
    lines += [f"| {r} | `{report.refs[r]}` | `{report.fingerprints[r]}` |" for r in report.refs]
    lines += ["", "## Knobs", ""] + [f"- `{k}`: {v}" for k, v in knobs.items()]
    lines += ["", "## Settings", "",
              f"- layers: {list(recipe.layers) if recipe.layers else 'all'}",
              f"- embeddings: {recipe.embeddings}", f"- compute dtype: {recipe.dtype}",
              f"- output dtype: {recipe.out_dtype or 'the VLM own, per tensor'}", f"- seed: {recipe.seed}",
              f"- merge time: {seconds:.1f} s", "",
              "Only language-model weights changed; the vision tower and projector are the VLM's, bit for bit.",
              "The full recipe is in `recipe.yaml`."]
    lines += ["", *handoff.mergekit_section(recipe, knobs), "", *handoff.lmms_eval_section(report.layouts["vlm"].family)]
    warn = notes + report.warnings
    if warn:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in warn]
    return "\n".join(lines) + "\n"
