"""Rank every registered merge method on the bundled family (`python -m analysis leaderboard`).

For each method: its defaults, and the best knobs of a small grid chosen on a *dev split*
(items generated from their own seed and checked disjoint from the held-out eval suites),
then both scored on the held-out suites, and any fixed variants the method names
(MergeMethod.variants, e.g. frank's two forms of its prior), each a row of its own. Every merge goes through the engine's in-place
merger (merging.inplace), so the numbers are those of the real methods, not re-implementations.
A tune's folder (`--tuned DIR`, analysis.tune) adds a row after its method's: the point its front's
selection chose on the tune's dev split, scored here on the same held-out items as every other row.

Selection rule on dev [choice]: among the grid points whose perception is within 3 points of
the VLM's, the highest visual_math (ties: higher perception); if none keeps perception, the
highest perception + visual_math.

Every held-out accuracy carries its 95% Wilson interval and every change from the VLM a paired
bootstrap interval over the same items (analysis.intervals); a change whose interval holds 0 is
marked "noise" in the table.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.colors import qualitative

from analysis import intervals, tune_results
from analysis.evaluate import EVAL_DIR, SUITES, evaluate, load_model, load_suite
from analysis.knob_figures import describe
from merging import methods
from merging.errors import Cancelled, LabError
from merging.inplace import InPlaceMerger
from merging.output_folder import AtomicFolder
from merging.recipe import from_dict
from tasks import toydata as td

DEV_SEED = 30_000
PERCEPTION_SLACK = 0.03  # the free-lunch bound: perception within 3 points of the VLM


def grid(method: str, num_layers: int) -> list[dict]:
    """The small knob grid searched on dev for one method (MergeMethod.grid); the defaults are always
    scored first, so a grid point that is the defaults ({}) is not scored again."""
    return [knobs for knobs in methods.get(method).grid(num_layers) if knobs]


# ------------------------------------------------------------------------------------ dev split
def _image_digest(image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def _eval_keys(eval_dir: Path) -> tuple[set[str], set[str]]:
    """(digests of every eval image, every eval question of the text suite)."""
    digests, texts = set(), set()
    for suite in SUITES:
        for item in load_suite(suite, None, eval_dir):
            if item.get("pil") is not None:
                digests.add(_image_digest(item["pil"]))
            else:
                texts.add(item["question"])
    return digests, texts


def build_dev_split(n: int, eval_dir: Path = EVAL_DIR, seed: int = DEV_SEED) -> dict[str, list[dict]]:
    """n items per suite, disjoint from the eval suites: no eval image, no eval text question."""
    digests, texts = _eval_keys(eval_dir)
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {s: [] for s in SUITES}
    seen: set[str] = set()

    def add(suite: str, item: td.Item) -> None:
        pil = td.render(item.scene) if item.scene is not None else None
        key = _image_digest(pil) if pil is not None else item.question
        if key in seen or key in digests or item.question in texts and pil is None:
            return
        seen.add(key)
        out[suite].append({"id": f"dev-{suite}-{len(out[suite]):04d}", "question": item.question,
                           "answer": item.final, "pil": pil})

    while min(len(v) for v in out.values()) < n:
        if len(out["perception"]) < n:
            add("perception", td.perception_item(td.random_scene(rng), rng.choice(td.PERCEPTION_KINDS)))
        if len(out["visual_math"]) < n:
            add("visual_math", td.random_visual_math(rng)[1])
        if len(out["text_math"]) < n:
            key, item = td.random_text_math(rng)
            if td.is_heldout(key):  # like the eval suite: combinations training never drew
                add("text_math", item)
    return out


def write_split(items: dict[str, list[dict]], folder: Path) -> Path:
    """Write a split in the eval-suite layout (suite.jsonl + images/) so evaluate() can read it."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for suite, rows in items.items():
        with (folder / f"{suite}.jsonl").open("w") as f:
            for row in rows:
                image = None
                if row["pil"] is not None:
                    image = f"images/{row['id']}.png"
                    row["pil"].save(folder / image)
                f.write(json.dumps({"id": row["id"], "question": row["question"], "answer": row["answer"],
                                    "image": image}) + "\n")
    return folder


# ------------------------------------------------------------------------------------- scoring
@dataclass
class Entry:
    method: str
    label: str  # "defaults", "best on dev" or a variant's own label
    knobs: dict
    dev: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    details: str = ""
    correct: dict = field(default_factory=dict)  # suite -> "0110..." per held-out item
    ci: dict = field(default_factory=dict)  # suite -> [lo, hi], 95% Wilson
    vs_vlm: dict = field(default_factory=dict)  # suite -> paired_difference() against the VLM


def selection_details(method: str, extra: dict) -> str:
    """What the merge selected, from the method's diagnostics (the dict InPlaceMerger.apply returns)."""
    return methods.get(method).selection_details(extra)


def _rank(d: dict, floor: float) -> tuple:
    """Sort key of the selection rule: keeps perception first, then visual_math (or the sum if not)."""
    keeps = d["perception"] >= floor
    return keeps, d["visual_math"] if keeps else d["perception"] + d["visual_math"], d["perception"]


def better(a: dict, b: dict | None, floor: float) -> bool:
    """Is dev score a better than b under the selection rule?"""
    return b is None or _rank(a, floor) > _rank(b, floor)


def variants(method: str, num_layers: int) -> list[tuple[str, dict]]:
    """The method's fixed variants, (label, knobs): rows scored on test only, never tuned."""
    return methods.get(method).variants(num_layers)


def steps(names, num_layers: int, grid_size: int | None = None, tuned: int = 0) -> int:
    """How many scorings run() makes: the VLM on dev and test, the reasoner on test, and per method
    its defaults and grid points on dev plus defaults, the dev-best and its variants on test; one per tune."""
    return 3 + tuned + sum(len(grid(n, num_layers)[:grid_size]) + 3 + len(variants(n, num_layers)) for n in names)


class Board:
    """The VLM loaded once, merged in place for every grid point, restored between them.

    progress(done, total, message) after each scoring; cancel() -> True stops the run (Cancelled)
    between batches and between merged tensors."""

    def __init__(self, family: Path, dev_dir: Path, limit: int | None, progress=None, cancel=None):
        self.family, self.dev_dir, self.limit, self.progress, self.cancel = family, dev_dir, limit, progress, cancel
        self.model, self.proc = load_model(family / "vlm")
        self.merger = InPlaceMerger(self.model, str(family / "vlm"), str(family / "math"), str(family / "base"))
        self.num_layers = self.merger.num_layers
        self.done, self.total = 0, 0

    def check(self, *_) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()

    def step(self, message: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, message)

    def score(self, split: str, model=None) -> dict:
        """Accuracy of the live VLM (or `model`, a (model, processor) pair) on dev or the held-out test."""
        eval_dir = self.dev_dir if split == "dev" else self.family / "eval"
        return evaluate(model or (self.model, self.proc), limit=self.limit, eval_dir=eval_dir, progress=self.check)

    def score_test(self, entry: Entry, model=None) -> Entry:
        """entry.test (accuracy) and entry.correct (each held-out item's outcome) of the live VLM or `model`."""
        out = evaluate(model or (self.model, self.proc), limit=self.limit, eval_dir=self.family / "eval",
                       progress=self.check, return_items=True)
        entry.test = out["accuracy"]
        entry.correct = {s: "".join("1" if r["correct"] else "0" for r in recs) for s, recs in out["items"].items()}
        return entry

    def merged(self, method: str, knobs: dict) -> dict:
        fam = self.family
        rec = from_dict({"vlm": str(fam / "vlm"), "reasoner": str(fam / "math"), "base": str(fam / "base"),
                         "method": method, "parameters": dict(knobs)})
        return self.merger.apply(rec, cancel=self.cancel) or {}

    def run_method(self, method: str, vlm_dev: dict, grid_size: int | None = None) -> list[Entry]:
        floor = vlm_dev["perception"] - PERCEPTION_SLACK
        defaults = Entry(method, "defaults", {})
        best, best_dev, best_details = None, None, ""
        for knobs in [{}] + grid(method, self.num_layers)[:grid_size]:
            extra = self.merged(method, knobs)
            dev = self.score("dev")
            self.step(f"{method} {describe(knobs)}: dev {fmt(dev)}")
            if not knobs:
                defaults.dev, defaults.details = dev, selection_details(method, extra)
                self.score_test(defaults)
                self.step(f"{method} defaults: test {fmt(defaults.test)}")
            if better(dev, best_dev, floor):
                best, best_dev, best_details = knobs, dev, selection_details(method, extra)
            self.merger.restore()
        tuned = Entry(method, "best on dev", best or {}, best_dev, details=best_details)
        self.merged(method, tuned.knobs)
        self.score_test(tuned)
        best_text = describe(tuned.knobs) if tuned.knobs else "its defaults"
        self.step(f"{method} best on dev ({best_text}): test {fmt(tuned.test)}")
        self.merger.restore()
        return [defaults, tuned] + [self.variant(method, label, knobs) for label, knobs in
                                    variants(method, self.num_layers)]

    def tuned(self, result: dict) -> Entry:
        """A tune's chosen point (pareto.json's best: chosen on the tune's own dev split) scored on test."""
        b = result["best"]
        extra = self.merged(result["method"], b["knobs"])
        entry = Entry(result["method"], f"tuned ({result['trials']} trials)", dict(b["knobs"]),
                      {s: v["acc"] for s, v in b["dev"].items()}, details=selection_details(result["method"], extra))
        self.score_test(entry)
        self.step(f"{result['method']} tuned ({describe(b['knobs'])}): test {fmt(entry.test)}")
        self.merger.restore()
        return entry

    def variant(self, method: str, label: str, knobs: dict) -> Entry:
        """One fixed variant merged and scored on test (not on dev: nothing is chosen from it)."""
        extra = self.merged(method, knobs)
        entry = Entry(method, label, dict(knobs), details=selection_details(method, extra))
        self.score_test(entry)
        self.step(f"{method} {label} ({describe(knobs)}): test {fmt(entry.test)}")
        self.merger.restore()
        return entry


def fmt(acc: dict) -> str:
    return " ".join(f"{s} {100 * acc[s]:.1f}" for s in SUITES if s in acc)


def _baselines(board: Board) -> list[Entry]:
    """The VLM on dev and test, the reasoner on test."""
    vlm = Entry("vlm", "the VLM", {}, board.score("dev"))
    board.step(f"the VLM: dev {fmt(vlm.dev)}")
    board.score_test(vlm)
    board.step(f"the VLM: test {fmt(vlm.test)}")
    reasoner = board.score_test(Entry("reasoner", "the math LLM", {}), load_model(board.family / "math"))
    board.step(f"the math LLM: test {fmt(reasoner.test)}")
    return [vlm, reasoner]


def run(family: Path, out_dir: Path, limit: int | None = None, dev_items: int = 100, only=None,
        progress=None, grid_size: int | None = None, cancel=None, tuned=()) -> dict:
    """The whole leaderboard; writes leaderboard.json, leaderboard.md, leaderboard.html into out_dir.
    tuned: tune folders (each a row after its method's). progress(done, total, message) after each
    scoring; cancel() -> True stops it (Cancelled, out_dir left as it was)."""
    names = methods.names() if not only else list(only)
    for n in names:
        methods.get(n)  # unknown names fail before any work
    tunes = [tune_results.read(Path(d)) for d in tuned]  # so do unreadable tune folders
    with AtomicFolder(out_dir, inputs=(family, *map(Path, tuned)), kind="leaderboard", replace_own=True) as tmp:
        dev_dir = write_split(build_dev_split(dev_items, family / "eval"), tmp / "dev")
        board = Board(family, dev_dir, limit, progress, cancel)
        for t in tunes:  # before any scoring
            if t["settings"]["num_layers"] != board.num_layers:
                raise LabError(f"--tuned: the {t['method']} tune ran on a {t['settings']['num_layers']}-layer "
                               f"model, this family's has {board.num_layers}")
        board.total = steps(names, board.num_layers, grid_size, len(tunes))
        entries = _baselines(board)
        for name in names:
            entries += board.run_method(name, entries[0].dev, grid_size)
            entries += [board.tuned(t) for t in tunes if t["method"] == name]
        entries += [board.tuned(t) for t in tunes if t["method"] not in names]
        add_intervals(entries)
        result = {"limit": limit, "dev_items": dev_items, "num_layers": board.num_layers,
                  "entries": [e.__dict__ for e in entries]}
        (tmp / "leaderboard.json").write_text(json.dumps(result, indent=1) + "\n")
        (tmp / "leaderboard.md").write_text(markdown(result) + "\n")
        scatter(result).write_html(tmp / "leaderboard.html", include_plotlyjs=True)  # works offline
    return result


def add_intervals(entries: list[Entry]) -> None:
    """Each entry's 95% Wilson interval per suite, and its paired bootstrap difference from the VLM
    on the same held-out items (the VLM's own row: none)."""
    vlm = next(e for e in entries if e.method == "vlm")
    for e in entries:
        for s, bits in e.correct.items():
            iv = intervals.accuracy([b == "1" for b in bits])
            e.ci[s] = [iv["lo"], iv["hi"]]
            if e is not vlm and s in vlm.correct:
                e.vs_vlm[s] = intervals.paired_difference([b == "1" for b in vlm.correct[s]], [b == "1" for b in bits])


def cell(e: dict, s: str) -> str:
    """'79.3 ±6.5': the accuracy in %, ± half its 95% Wilson interval's width (the interval is
    [lo, hi] in the JSON; it is not symmetric near 0 or 100)."""
    if s not in e["test"]:
        return "-"
    lo_hi = e.get("ci", {}).get(s)
    pm = f" ±{50 * (lo_hi[1] - lo_hi[0]):.1f}" if lo_hi else ""
    return f"{100 * e['test'][s]:.1f}{pm}"


def delta(e: dict, s: str, vlm: dict) -> str:
    """'+46.0 [38.0, 54.0]' points against the VLM, with 'noise' when the interval holds 0."""
    if s not in e["test"] or s not in vlm:
        return "-"
    d = e.get("vs_vlm", {}).get(s)
    if d is None:
        return f"{100 * (e['test'][s] - vlm[s]):+.1f}"
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]" + (" noise" if d["noise"] else "")


def markdown(result: dict) -> str:
    vlm = next(e for e in result["entries"] if e["method"] == "vlm")["test"]
    lines = ["| method | knobs | perception | visual_math | text_math | d perception | d visual_math | selection |",
             "|---|---|---|---|---|---|---|---|"]
    for e in result["entries"]:
        cells = [cell(e, s) for s in SUITES]
        dp, dv = (delta(e, s, vlm) for s in ("perception", "visual_math"))
        knobs = describe(e["knobs"]) if e["knobs"] else e["label"]  # a tune's schedule: start -> end
        if e["knobs"]:
            knobs = f"{e['label']}: {knobs}"
        lines.append(f"| {e['method']} | {knobs} | " + " | ".join(cells) + f" | {dp} | {dv} | {e['details']} |")
    return "\n".join(lines)


def _bar(e: dict, s: str) -> dict | None:
    """A point's 95% Wilson interval as plotly error bars (in %), thin, in the point's colour."""
    lo_hi = e.get("ci", {}).get(s)
    if not lo_hi:
        return None
    acc = 100 * e["test"][s]
    return {"type": "data", "symmetric": False, "array": [100 * lo_hi[1] - acc], "arrayminus": [acc - 100 * lo_hi[0]],
            "thickness": 1, "width": 0}


def scatter(result: dict):
    """Perception vs visual_math, one point per method and setting (one colour per method: open for
    its defaults, filled for its best on dev); the free-lunch target shaded; the legend below."""
    vlm = next(e for e in result["entries"] if e["method"] == "vlm")["test"]
    fig = go.Figure()
    x0, y0 = 100 * (vlm["perception"] - PERCEPTION_SLACK), 100 * vlm["visual_math"] + 10
    fig.add_shape(type="rect", x0=x0, x1=100, y0=y0, y1=100, fillcolor="rgba(40,160,80,0.12)", line_width=0)
    fig.add_annotation(x=100, y=y0, text="target: perception within 3, visual_math +10", showarrow=False,
                       xanchor="right", yanchor="bottom", font={"size": 11, "color": "#2a7a40"})
    top = max((100 * e["test"]["visual_math"] for e in result["entries"] if "visual_math" in e["test"]), default=0)
    palette = qualitative.Plotly + qualitative.D3
    methods_shown = dict.fromkeys(e["method"] for e in result["entries"] if "perception" in e["test"])
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods_shown)}
    for e in result["entries"]:
        t = e["test"]
        if "perception" not in t:
            continue  # the text-only reasoner has no image suites
        symbol = {"best on dev": "circle", "defaults": "circle-open"}.get(e["label"], "diamond-open")
        if e["label"].startswith("tuned"):
            symbol = "square"
        fig.add_trace(go.Scatter(
            x=[100 * t["perception"]], y=[100 * t["visual_math"]], mode="markers", name=f"{e['method']} ({e['label']})",
            hovertext=f"{e['method']} ({e['label']}) {describe(e['knobs']) if e['knobs'] else ''}: perception {cell(e, 'perception')}, "
                      f"visual_math {cell(e, 'visual_math')}",
            error_x=_bar(e, "perception"), error_y=_bar(e, "visual_math"),
            marker={"size": 16 if e["method"] == "vlm" else 11, "line": {"width": 2}, "color": colours[e["method"]],
                    "symbol": "star" if e["method"] == "vlm" else symbol}))
    fig.update_layout(title={"text": "Perception vs visual math on the held-out suites<br><sup>open: a method's "
                             "defaults · filled: its best knobs on dev · square: its tuned point · diamond: a variant "
                             "it names · star: the VLM · bars: 95% intervals</sup>"},
                      xaxis={"title": "perception accuracy (%)", "range": [-3, 103], "dtick": 10},
                      yaxis={"title": "visual_math accuracy (%)", "range": [-2, min(103, max(40, y0 + 5, top + 5))],
                             "dtick": 10},
                      template="plotly_white", height=640, margin={"t": 80},
                      legend={"font": {"size": 11}, "orientation": "h", "yanchor": "top", "y": -0.14, "x": 0})
    return fig


def main_leaderboard(args) -> int:
    family = Path(args.family) if args.family else EVAL_DIR.parent
    if not (family / "vlm").is_dir():
        raise LabError(f"{family} has no vlm/ folder: not a model family like assets/toy")
    torch.set_num_threads(args.threads)
    result = run(family, Path(args.out_dir), args.limit, args.dev_items, args.methods or None,
                 progress=lambda done, total, m: print(f"[{done}/{total}] {m}", flush=True), grid_size=args.grid_size,
                 tuned=args.tuned or ())
    print(markdown(result))
    print(f"\nwrote {args.out_dir}/leaderboard.md, leaderboard.json, leaderboard.html")
    return 0
