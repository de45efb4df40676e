"""The analysis jobs the worker runs, each returning plotly figures as JSON plus a one-line summary.

Results come from analysis.cache when the same analysis of the same checkpoints (and recipe,
images, settings) was computed before. A missing analysis backend is reported as a clear message.
"""

from __future__ import annotations

import importlib

from merging.errors import LabError
from webapp.jobs import recipe_key, triple_of

NAMES = ("spectra", "similarity", "attention", "knockout", "changes")


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LabError(f"this analysis is not available in this build yet ({module}: {e})") from None


def _fingerprints(refs) -> list[str]:
    from merging.checkpoint import Checkpoint

    out = []
    for ref in refs:
        with Checkpoint.open(ref) as ck:
            out.append(ck.fingerprint)
    return out


def _cached(worker, name, key, compute, use_cache=True):
    if not use_cache:
        return compute()
    cache = _need("analysis.cache")
    return cache.cached(name, key, compute, worker.cache_dir)


def run_analysis(worker, job_id: int, args: dict, flag) -> dict:
    name = args["name"]
    if name not in NAMES:
        raise LabError(f"unknown analysis {name!r}; choose one of {', '.join(NAMES)}")
    progress = worker.progress_fn(job_id, flag)
    figures = _need("analysis.figures")
    return globals()[f"_{name}"](worker, args, progress, figures)


def _triple(args):
    t = args["triple"]
    return t["vlm"], t["reasoner"], t["base"]


def _spectra(worker, args, progress, figures):
    spectra = _need("analysis.spectra")
    k = int(args.get("k", 32))
    data = spectra.spectra(*_triple(args), k=k, device=worker.device, progress=progress,
                           cache_dir=worker.cache_dir)
    return {"figures": [figures.spectra_figure(data).to_json(), figures.ratio_figure(data).to_json()],
            "summary": f"top-{k} singular values of both task vectors, {data['num_layers']} layers"}


def _similarity(worker, args, progress, figures):
    similarity = _need("analysis.similarity")
    rank = int(args.get("rank", 32))
    data = similarity.similarity(*_triple(args), rank=rank, device=worker.device, progress=progress,
                                 cache_dir=worker.cache_dir)
    cos = [abs(c) for c in data.get("block_cos", [])]
    summary = f"largest |cosine| of a whole block: {max(cos):.3f}" if cos else ""
    return {"figures": [figures.similarity_figure(data).to_json()], "summary": summary}


def _attention(worker, args, progress, figures):
    attention = _need("analysis.attention")
    from webapp.presets import TOY_ROOT

    if args.get("images"):
        from webapp.safety import check_images

        check_images(args["images"])
    chosen = args.get("images") or sorted((TOY_ROOT / "samples").glob("*.png")) or None
    images = attention.load_images(chosen, limit=int(args.get("limit", 16)))
    triple = tuple(_triple(args))
    question = args.get("question") or attention.DEFAULT_QUESTION
    key = {"fp": _fingerprints(triple[:1]), "images": attention.images_key(images), "question": question}

    def compute():
        loaded = worker.models.get(triple, progress)
        loaded.ensure(None, progress=progress)  # FRANK's prior is measured on the original VLM
        model = loaded.model
        before = getattr(model.config, "_attn_implementation", None)
        model.set_attn_implementation("eager")
        try:
            return attention.attention_decay(model, loaded.processor, images, question, limit=None,
                                             device=worker.device, progress=progress)
        finally:
            if before and before != "eager":
                model.set_attn_implementation(before)

    data = _cached(worker, "webapp-attention", key, compute)
    summary = (f"beta = {data['beta']:.3f} (fit R² = {data.get('r2', float('nan')):.2f}) on "
               f"{data['n_images']} image(s); use this beta for frank's prior")
    return {"figures": [figures.attention_figure(data).to_json()], "summary": summary, "beta": data["beta"]}


def _knockout(worker, args, progress, figures):
    knockout = _need("analysis.knockout")
    triple = tuple(_triple(args))
    recipe = args.get("recipe")
    limit = int(args.get("limit", 8))
    models = [("VLM", None)] + ([(f"merged ({recipe['method']})", recipe)] if recipe else [])
    key = {"fp": _fingerprints([r for r in triple if r]), "recipe": recipe_key(recipe), "limit": limit}

    from functools import partial

    from analysis.evaluate import evaluate
    from webapp.presets import TOY_ROOT

    evaluate_fn = partial(evaluate, eval_dir=TOY_ROOT / "eval")

    def compute():
        loaded = worker.models.get(triple, progress)
        results = {}
        for label, rec in models:
            loaded.ensure(rec, progress=progress)
            results[label] = knockout.knockout(loaded.model, loaded.processor, evaluate_fn, limit=limit,
                                               device=worker.device, progress=progress)
        return results

    data = _cached(worker, "webapp-knockout", key, compute)
    return {"figures": [figures.knockout_figure(data).to_json()],
            "summary": f"{limit} eval item(s) per suite; models: {', '.join(data)}"}


def _changes(worker, args, progress, figures):
    changes = _need("analysis.changes")
    recipe = args.get("recipe")
    if not recipe:
        raise LabError("merge first: the change map compares the merged model with the VLM")
    triple = triple_of(recipe)
    key = {"fp": _fingerprints([r for r in triple if r]), "recipe": recipe_key(recipe)}

    def compute():
        loaded = worker.models.get(triple, progress)
        loaded.ensure(recipe, progress=progress)
        return changes.change_map(loaded.model, recipe["vlm"], progress=progress)

    data = _cached(worker, "webapp-changes", key, compute)
    return {"figures": [figures.changes_figure(data).to_json()],
            "summary": f"largest relative change: {data.get('max', 0) * 100:.2f}% of the VLM's weights"}
