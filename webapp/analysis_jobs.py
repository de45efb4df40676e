"""The analysis jobs the worker runs, each returning plotly figures as JSON plus a one-line summary.

Results come from analysis.cache when the same analysis of the same weights (and images,
settings) was computed before. Analyses of the live model are keyed on the weights they run on
(merging.inplace.weights_id: the VLM checkpoint's fingerprint for the original, the triple and
merge key for a merge), and compute() checks the merger really holds those weights before running,
so a result is never stored under weights it was not computed on. A missing analysis backend is
reported as a clear message.
"""

from __future__ import annotations

import importlib

from merging.errors import LabError
from webapp.jobs import triple_of

NAMES = ("spectra", "similarity", "attention", "knockout", "changes")


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LabError(f"this analysis is not available in this build yet ({module}: {e})") from None


def _weights_id(triple, recipe: dict | None) -> str:
    """weights_id() of the state `recipe` asks for (None: the original VLM), without loading a model."""
    from merging.inplace import merge_key, triple_fingerprints, weights_id
    from merging.recipe import from_dict

    if recipe is None:
        return weights_id(triple_fingerprints(triple[0], None), None)
    return weights_id(triple_fingerprints(*triple), merge_key(from_dict(recipe)))


def _held(worker, triple, recipe: dict | None, expected: str, progress):
    """The loaded model holding `recipe`'s weights, checked to be the ones the cache key names."""
    loaded = worker.models.get(triple, progress)
    if loaded.hold(recipe, progress=progress) != expected:
        raise LabError("internal: the loaded weights differ from the ones this analysis is cached under")
    return loaded


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
    weights = _weights_id(triple, None)  # FRANK's prior is measured on the original VLM
    key = {"weights": weights, "images": attention.images_key(images), "question": question}

    def compute():
        loaded = _held(worker, triple, None, weights, progress)
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
    recipe = args.get("recipe")
    triple = triple_of(recipe) if recipe else tuple(_triple(args))  # the merge's own triple
    limit = int(args.get("limit", 8))
    models = [("VLM", None)] + ([(f"merged ({recipe['method']})", recipe)] if recipe else [])

    from functools import partial

    from analysis.evaluate import evaluate
    from webapp.presets import TOY_ROOT

    evaluate_fn = partial(evaluate, eval_dir=TOY_ROOT / "eval")

    def one(rec, weights):
        def compute():
            loaded = _held(worker, triple, rec, weights, progress)
            return knockout.knockout(loaded.model, loaded.processor, evaluate_fn, limit=limit,
                                     device=worker.device, progress=progress)

        return _cached(worker, "webapp-knockout", {"weights": weights, "limit": limit}, compute)

    # One entry per model: the VLM's baseline is shared by every recipe's request.
    data = {label: one(rec, _weights_id(triple, rec)) for label, rec in models}
    return {"figures": [figures.knockout_figure(data).to_json()],
            "summary": f"{limit} eval item(s) per suite; models: {', '.join(data)}"}


def _changes(worker, args, progress, figures):
    changes = _need("analysis.changes")
    recipe = args.get("recipe")
    if not recipe:
        raise LabError("merge first: the change map compares the merged model with the VLM")
    triple = triple_of(recipe)
    weights = _weights_id(triple, recipe)
    key = {"weights": weights}

    def compute():
        loaded = _held(worker, triple, recipe, weights, progress)
        return changes.change_map(loaded.model, recipe["vlm"], progress=progress)

    data = _cached(worker, "webapp-changes", key, compute)
    return {"figures": [figures.changes_figure(data).to_json()],
            "summary": f"largest relative change: {data.get('max', 0) * 100:.2f}% of the VLM's weights"}
