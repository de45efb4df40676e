"""`python -m analysis report RECIPE OUT_DIR`: every analysis that applies, as HTML + report.json.

Figures are standalone HTML with plotly.js embedded (they must open offline); the numbers go
into one report.json. The output folder is written by merging.writer.AtomicFolder (under a
temporary name, then renamed into place), so a crash or Ctrl-C never leaves a half-written
report, and OUT_DIR is never an input, a folder holding one, or a non-empty folder that is not
an earlier report (unless --overwrite). Results are cached (analysis.cache), so
a second report on the same triple is fast; the merged model for the change map and knockout
is only built when one of them is not cached yet.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from analysis import figures
from analysis.cache import cached

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _opt(args, name, default):
    return getattr(args, name, None) if getattr(args, name, None) is not None else default


class LazyMerge:
    """The recipe merged into a temporary folder, built on first use and removed at the end."""

    def __init__(self, recipe, device, progress, parent: Path):
        self.recipe, self.device, self.progress, self.parent = recipe, device, progress, parent
        self._tmp: Path | None = None

    def path(self) -> Path:
        if self._tmp is None:
            from merging.engine import merge_to_disk

            self._tmp = Path(tempfile.mkdtemp(prefix=".merge-lab-merged-", dir=self.parent))
            merge_to_disk(self.recipe, self._tmp / "model", device=self.device, progress=self.progress)
        return self._tmp / "model"

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _eval_key() -> str:
    """Content hash of the eval suites, so knockout results follow regenerated suites."""
    from analysis.evaluate import EVAL_DIR

    h = hashlib.sha256()
    for f in sorted(EVAL_DIR.glob("*.jsonl")) if EVAL_DIR.is_dir() else []:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:24]


def _fingerprint(ref) -> str:
    from merging.checkpoint import Checkpoint

    with Checkpoint.open(ref) as ck:
        return ck.fingerprint


def compute_all(recipe, args, progress, step, workdir: Path | None = None) -> tuple[dict, dict, dict]:
    """(results, skipped reasons, figures). `step(name)` marks the start of each analysis.
    workdir: where the temporary merged model goes (default: beside OUT_DIR)."""
    from analysis import attention, changes, similarity, spectra

    device = _opt(args, "device", "cpu")
    cache_dir = _opt(args, "cache_dir", None)
    results, skipped, figs = {}, {}, {}
    fp = {"vlm": _fingerprint(recipe.vlm), "reasoner": _fingerprint(recipe.reasoner)}
    merge_key = {"fp": fp, "base": _fingerprint(recipe.base) if recipe.base else None, "recipe": recipe.to_dict()}
    merged = LazyMerge(recipe, device, progress, workdir or Path(args.out_dir).resolve().parent)
    try:
        step("spectra")
        if recipe.base:
            k, svd = _opt(args, "k", 64), _opt(args, "svd", "auto")
            results["spectra"] = spectra.spectra(recipe.vlm, recipe.reasoner, recipe.base, k, svd, device,
                                                 progress, cache_dir)
            figs["spectra"] = figures.spectra_figure(results["spectra"])
            figs["nuclear_ratio"] = figures.ratio_figure(results["spectra"])
            step("similarity")
            rank = _opt(args, "rank", 32)
            results["similarity"] = similarity.similarity(recipe.vlm, recipe.reasoner, recipe.base, rank, svd,
                                                          device, progress, cache_dir)
            figs["similarity"] = figures.similarity_figure(results["similarity"])
        else:
            skipped["spectra"] = skipped["similarity"] = "the recipe has no base model, so there are no task vectors"
            step("similarity")

        step("attention")
        from merging import hub

        vlm_dir = hub.resolve(recipe.vlm)
        if not any((vlm_dir / f).is_file() for f in PROCESSOR_FILES):
            skipped["attention"] = f"{recipe.vlm} has no image processor ({' / '.join(PROCESSOR_FILES)})"
        else:
            imgs = attention.load_images(_opt(args, "images", None) or None, _opt(args, "attention_images", 16))
            key = {"fp": fp["vlm"], "images": attention.images_key(imgs), "q": attention.DEFAULT_QUESTION}

            def attn():
                model, proc = attention.load_vlm(vlm_dir, device)
                return attention.attention_decay(model, proc, imgs, device=device, progress=progress)

            results["attention"] = cached("attention", key, attn, cache_dir)
            figs["attention"] = figures.attention_figure(results["attention"])

        step("changes")
        results["changes"] = cached("changes", merge_key,
                                    lambda: changes.change_map(merged.path(), recipe.vlm, progress), cache_dir)
        figs["changes"] = figures.changes_figure(results["changes"])

        step("knockout")
        if not _opt(args, "knockout", False):
            skipped["knockout"] = "not requested (add --knockout; it evaluates the model once per layer and module)"
        else:
            results["knockout"] = _knockout(recipe, merged, merge_key, args, progress, cache_dir)
            figs["knockout"] = figures.knockout_figure(results["knockout"])
    finally:
        merged.cleanup()
    return results, skipped, figs


def _knockout(recipe, merged: LazyMerge, merge_key, args, progress, cache_dir) -> dict:
    from analysis import knockout
    from analysis.evaluate import load_model

    device, limit = _opt(args, "device", "cpu"), _opt(args, "knockout_limit", 20)
    out = {}
    for label, key, where in (("VLM", merge_key["fp"]["vlm"], lambda: recipe.vlm),
                              ("merged", merge_key, merged.path)):
        def run(where=where):
            from merging import hub

            model, proc = load_model(hub.resolve(where()), device)
            return knockout.knockout(model, proc, limit=limit, device=device, progress=progress)

        out[label] = cached("knockout", {"model": key, "limit": limit, "eval": _eval_key()}, run, cache_dir)
    return out


def write_report(folder: Path, results: dict, skipped: dict, figs: dict, meta: dict) -> None:
    """The figures, report.json and index.html into `folder` (AtomicFolder's temp folder)."""
    from merging.writer import WriteError, write_text

    for name, fig in figs.items():
        try:
            # include_plotlyjs=True embeds plotly.js (~4 MB): the file works offline and alone.
            fig.write_html(folder / f"{name}.html", include_plotlyjs=True, full_html=True)
        except OSError as e:
            raise WriteError(f"could not write {folder / name}.html: {e.strerror or e}") from None
    report = {**meta, "figures": {n: f"{n}.html" for n in figs}, "skipped": skipped, "results": results}
    write_text(folder / "report.json", json.dumps(report, indent=1, allow_nan=True))
    write_text(folder / "index.html", _index_html(figs, skipped, meta))


def _index_html(figs: dict, skipped: dict, meta: dict) -> str:
    links = "".join(f'<li><a href="{n}.html">{n.replace("_", " ")}</a></li>' for n in figs)
    skips = "".join(f"<li>{n}: {r}</li>" for n, r in skipped.items())
    r = meta["recipe"]
    return (f"<!doctype html><meta charset='utf-8'><title>merge-lab report</title>"
            f"<h1>merge-lab report</h1><p>VLM {r['vlm']}<br>reasoner {r['reasoner']}<br>base {r.get('base')}"
            f"<br>method {r['method']} {r.get('parameters', {})}</p><h2>Figures</h2><ul>{links}</ul>"
            f"<h2>Skipped</h2><ul>{skips or '<li>none</li>'}</ul><p>Numbers: <a href='report.json'>report.json</a></p>")


def main_report(args) -> int:
    from merging.engine import check_device
    from merging.recipe import load
    from merging.writer import AtomicFolder

    recipe = load(args.recipe)
    check_device(_opt(args, "device", "cpu"))
    inputs = (recipe.vlm, recipe.reasoner, recipe.base, args.recipe, *(_opt(args, "images", None) or ()))
    t0 = time.perf_counter()
    # Entered first, so a bad OUT_DIR is refused before any analysis runs; an earlier report
    # there is replaced without --overwrite, anything else only with it.
    with AtomicFolder(args.out_dir, _opt(args, "overwrite", False), inputs, kind="report",
                      replace_own=True) as tmp:
        results, skipped, figs, timings = _run_all(recipe, args, tmp)
        meta = {"recipe": recipe.to_dict(), "timings_s": timings}
        if "attention" in results:
            att = results["attention"]
            # Ready to paste into a frank recipe: either the per-layer list or the fitted decay.
            meta["frank_prior_v"] = att["prior_v"]
            meta["frank_parameters"] = {"use_prior": 1, "beta": round(att["beta"], 6)}
        write_report(tmp, results, skipped, figs, meta)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"report written to {Path(args.out_dir).resolve()} ({len(figs)} figures, {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    return 0


def _run_all(recipe, args, workdir: Path) -> tuple[dict, dict, dict, dict]:
    """compute_all with a progress bar; also the seconds each analysis took."""
    from tqdm import tqdm

    steps = ("spectra", "similarity", "attention", "changes", "knockout")
    timings: dict[str, float] = {}
    with tqdm(total=len(steps), desc="report", unit="analysis", file=sys.stderr, dynamic_ncols=True) as bar:
        state = {"name": None, "t": time.perf_counter()}

        def step(name):
            now = time.perf_counter()
            if state["name"] is not None:
                timings[state["name"]] = round(now - state["t"], 3)
                bar.update(1)
            state.update(name=name, t=now)
            bar.set_description(f"report: {name}")

        def progress(done, total, message):
            bar.set_postfix_str(f"{message} ({done}/{total})", refresh=True)

        results, skipped, figs = compute_all(recipe, args, progress, step, workdir)
        timings[state["name"]] = round(time.perf_counter() - state["t"], 3)
        bar.update(1)
    return results, skipped, figs, timings
