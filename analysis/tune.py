"""A method's knobs searched on the dev split (`python -m analysis tune --method M --trials N --out DIR`).

optuna's multi-objective NSGA-II sampler maximises (perception, visual_math) on the leaderboard's
dev split (analysis.leaderboard.build_dev_split: its own seed, disjoint from the held-out suites),
over the knobs analysis.tune_space names (per-layer knobs as a start -> end schedule), starting
from the method's defaults and its leaderboard grid points. Each trial
merges the loaded VLM in place (merging.inplace.InPlaceMerger) and scores it; the merger is
restored after every trial, so the model ends as the checkpoint's weights.

DIR holds the study (an optuna journal file, appended trial by trial: a killed run loses at most
its trial in flight) and the dev split; a rerun on the same DIR continues the study, each run
adding its --trials (and stopping early at --seconds). The held-out suites are used once per run,
for the chosen point only: the leaderboard's selection rule (perception within 3 points of the
VLM's on dev, then the highest visual_math) applied to the Pareto front. pareto.json and
pareto.html are replaced whole (a temporary file renamed over the old one).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import optuna
import torch

from analysis import leaderboard as lb
from analysis import tune_space
from analysis.evaluate import EVAL_DIR, SUITES, load_model
from analysis.knob_figures import tune_figure, write_plots
from analysis.sweep import quiet_loading, score_live
from merging import methods
from merging.errors import Cancelled, LabError
from merging.inplace import InPlaceMerger
from merging.recipe import from_dict

JOURNAL = "study.journal"
STUDY = "tune"
OBJECTIVES = ("perception", "visual_math")
POPULATION = 10  # NSGA-II's generation size: small, as a study here has tens of trials
SEED = 0


class Tuner:
    """The VLM of a family loaded (or given), merged in place per trial, scored on dev."""

    def __init__(self, family: Path, folder: Path, merger: InPlaceMerger, model, proc, progress=None,
                 cancel=None):
        self.family, self.folder, self.merger, self.model, self.proc = family, folder, merger, model, proc
        self.progress, self.cancel = progress, cancel
        self.triple = {"vlm": merger.refs["vlm"], "reasoner": merger.refs["reasoner"],
                       "base": merger.refs.get("base")}

    def recipe(self, method: str, knobs: dict):
        return from_dict({**{k: v for k, v in self.triple.items() if v}, "method": method,
                          "parameters": dict(knobs)})

    def check(self, *_) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled")

    def score(self, recipe, split: str, limit: int | None, suites=OBJECTIVES) -> dict:
        """suite -> interval dict of `recipe` (None: the VLM) on dev or the held-out suites."""
        eval_dir = self.folder / "dev" if split == "dev" else self.family / "eval"
        try:
            if recipe is not None:
                self.merger.apply(recipe, cancel=self.cancel)
            return score_live(self.model, self.proc, eval_dir, limit, list(suites), self.check, batch_size=64)
        finally:
            self.merger.restore()


def open_study(folder: Path, method: str, settings: dict, seed: int) -> optuna.Study:
    """The study in folder (created, or continued when its settings match)."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL)))
    n_before = 0
    with contextlib.suppress(KeyError):  # no study yet
        n_before = len(optuna.load_study(study_name=STUDY, storage=storage).trials)
    sampler = optuna.samplers.NSGAIISampler(population_size=POPULATION, seed=seed + n_before)  # a rerun draws anew
    study = optuna.create_study(study_name=STUDY, storage=storage, directions=["maximize"] * len(OBJECTIVES),
                                sampler=sampler, load_if_exists=True)
    had = study.user_attrs.get("settings")
    if had is None:
        study.set_user_attr("settings", settings)
        for params in tune_space.start_points(method, settings["num_layers"]):
            study.enqueue_trial(params)
    elif had != settings:
        diff = next(k for k in settings if had.get(k) != settings[k])
        raise LabError(f"{folder} holds a study with {diff} {had.get(diff)!r}, not {settings[diff]!r}; "
                       "use another --out or the same settings")
    return study


def objective(tuner: Tuner, method: str, num_layers: int, limit: int, on_trial=None):
    def run_trial(trial: optuna.Trial) -> tuple[float, ...]:
        knobs = tune_space.suggest(trial, method, num_layers)
        try:
            rec = tuner.recipe(method, knobs)
        except LabError as e:  # a combination the method refuses (its validate)
            trial.set_user_attr("refused", str(e))
            raise optuna.TrialPruned() from None
        dev = tuner.score(rec, "dev", limit)
        trial.set_user_attr("knobs", knobs)
        trial.set_user_attr("dev", dev)
        if on_trial is not None:
            on_trial(trial.number, knobs, dev)
        return tuple(dev[s]["acc"] for s in OBJECTIVES)
    return run_trial


def completed(study: optuna.Study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def front(study: optuna.Study) -> list[dict]:
    """The non-dominated completed trials (optuna's best_trials), by perception."""
    pts = [{"trial": t.number, "knobs": t.user_attrs["knobs"], "dev": t.user_attrs["dev"]}
           for t in study.best_trials]
    return sorted(pts, key=lambda p: (p["dev"]["perception"]["acc"], p["dev"]["visual_math"]["acc"]))


def choose(points: list[dict], vlm_dev: dict) -> dict:
    """The leaderboard's selection rule over the front (analysis.leaderboard.better)."""
    floor = vlm_dev["perception"]["acc"] - lb.PERCEPTION_SLACK
    best = None
    for p in points:
        acc = {s: p["dev"][s]["acc"] for s in OBJECTIVES}
        if best is None or lb.better(acc, {s: best["dev"][s]["acc"] for s in OBJECTIVES}, floor):
            best = p
    return best


def _dev_split(folder: Path, family: Path, dev_items: int) -> None:
    """The leaderboard's dev split, written once into folder/dev (renamed in whole)."""
    if (folder / "dev" / "perception.jsonl").is_file():
        return
    tmp = folder / f".dev.tmp-{os.getpid()}"
    lb.write_split(lb.build_dev_split(dev_items, family / "eval"), tmp)
    os.rename(tmp, folder / "dev")


def check_folder(folder: Path) -> None:
    if folder.is_file():
        raise LabError(f"--out {folder} is a file; give a folder (new, or one an earlier tune wrote)")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / JOURNAL).is_file():
        raise LabError(f"--out {folder} is not empty and holds no tune study; give a new folder")
    folder.mkdir(parents=True, exist_ok=True)


def run(tuner: Tuner, method: str, trials: int, seconds: float | None = None, limit: int = 50,
        dev_items: int = 100, test_limit: int | None = None, on_trial=None) -> dict:
    """Add up to `trials` trials to the study in tuner.folder; write pareto.json/.html; the result."""
    methods.get(method)
    folder = tuner.folder
    num_layers = tuner.merger.num_layers
    if limit > dev_items:
        raise LabError(f"--limit {limit} is more than the {dev_items} dev items per suite")
    settings = {"method": method, "limit": limit, "dev_items": dev_items, "num_layers": num_layers,
                "dev_seed": lb.DEV_SEED, "objectives": list(OBJECTIVES)}
    check_folder(folder)
    _dev_split(folder, tuner.family, dev_items)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(folder, method, settings, SEED)
    if "vlm_dev" not in study.user_attrs:
        study.set_user_attr("vlm_dev", tuner.score(None, "dev", limit))
    t0 = time.monotonic()
    done = [0]

    def step(number, knobs, dev):
        done[0] += 1
        if tuner.progress:
            tuner.progress(done[0], trials, f"trial {number}: {tune_space.describe(knobs)}: "
                           + "  ".join(f"{s} {100 * dev[s]['acc']:.1f}" for s in OBJECTIVES))
        if on_trial:
            on_trial(number, knobs, dev)

    study.optimize(objective(tuner, method, num_layers, limit, step), n_trials=trials, timeout=seconds,
                   catch=())
    spent = round(study.user_attrs.get("search_seconds", 0.0) + time.monotonic() - t0, 1)
    study.set_user_attr("search_seconds", spent)
    return finish(tuner, study, test_limit)


def finish(tuner: Tuner, study: optuna.Study, test_limit: int | None) -> dict:
    """The front, the chosen point scored on the held-out suites (and the VLM), written out."""
    s = study.user_attrs["settings"]
    pts, vlm_dev = front(study), study.user_attrs["vlm_dev"]
    best = dict(choose(pts, vlm_dev))
    best["test"] = tuner.score(tuner.recipe(s["method"], best["knobs"]), "test", test_limit, SUITES)
    result = {"method": s["method"], "settings": s, "trials": len(completed(study)),
              "all_trials": len(study.trials), "search_seconds": study.user_attrs["search_seconds"],
              "test_limit": test_limit, "vlm_dev": vlm_dev,
              "vlm_test": tuner.score(None, "test", test_limit, SUITES), "front": pts, "best": best,
              "trials_dev": [{"trial": t.number, "knobs": t.user_attrs["knobs"], "dev": t.user_attrs["dev"]}
                             for t in completed(study)]}
    write_result(tuner.folder, result)
    return result


def write_result(folder: Path, result: dict) -> None:
    """pareto.json and the plot, each replaced whole."""
    tmp = folder / f".pareto.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, folder / "pareto.json")
    staging = folder / f".plot.tmp-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    result["plots"] = write_plots(tune_figure(result), staging, "pareto")
    for name in result["plots"]:
        os.replace(staging / name, folder / name)
    staging.rmdir()


def main_tune(args) -> int:
    family = Path(args.family) if args.family else EVAL_DIR.parent
    if not (family / "vlm").is_dir():
        raise LabError(f"{family} has no vlm/ folder: not a model family like assets/toy")
    methods.get(args.method)
    check_folder(Path(args.out_dir))
    torch.set_num_threads(args.threads)
    quiet_loading()
    model, proc = load_model(family / "vlm")
    merger = InPlaceMerger(model, str(family / "vlm"), str(family / "math"), str(family / "base"))
    tuner = Tuner(family, Path(args.out_dir), merger, model, proc,
                  progress=lambda d, t, m: print(f"[{d}/{t}] {m}", flush=True))
    r = run(tuner, args.method, args.trials, args.seconds, args.limit, args.dev_items, args.test_limit)
    b = r["best"]
    print(f"{r['trials']} trials in all, {r['search_seconds']} s of search; front: {len(r['front'])} points")
    print(f"chosen: {tune_space.describe(b['knobs'])}; held-out: " + "  ".join(
        f"{s} {100 * b['test'][s]['acc']:.1f} [{100 * b['test'][s]['lo']:.1f}, {100 * b['test'][s]['hi']:.1f}]"
        for s in SUITES if s in b["test"]))
    print(f"wrote {args.out_dir}/pareto.json and {', '.join(r['plots'])}"
          + ("" if len(r["plots"]) > 1 else " (no PNG: kaleido is not installed)"))
    return 0
