"""`python -m analysis eval MODEL_DIR [--suite NAME] [--suite-file ITEMS.jsonl]`,
`python -m analysis report RECIPE OUT_DIR`, `python -m analysis handout RECIPE OUT.html`,
`python -m analysis leaderboard [--limit N]`,
`python -m analysis sweep RECIPE --knob K --values V,... --out DIR`, `python -m analysis tune --method M --out DIR`
and `python -m analysis ask MODEL [--image IMG] "QUESTION"`.

Exit 0 on success, 2 with a one-line reason on stderr for bad input, 130 on SIGINT (143 on SIGTERM).
"""

import sys

from analysis import analyses
from analysis.ask import add_parser as add_ask
from analysis.ask import main_ask
from analysis.evaluate import main_eval
from merging.cli import Parser, count, run


def main(argv=None) -> int:
    ap = Parser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="accuracy of a model folder on the toy suites, as JSON")
    ev.add_argument("model_dir")
    ev.add_argument("--suite", default=None, help="perception, visual_math or text_math (default: all)")
    ev.add_argument("--suite-file", default=None, metavar="ITEMS.jsonl",
                    help="score your own items instead: one JSON object a line with question, answer and an "
                         "optional image path relative to the file's folder (reported as suite 'custom')")
    ev.add_argument("--limit", type=count, default=None, help="evaluate only the first N items of each suite")
    ev.add_argument("--device", default="cpu")
    rp = sub.add_parser("report", help="every analysis figure as HTML plus the numbers as JSON")
    rp.add_argument("recipe")
    rp.add_argument("out_dir")
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--cache-dir", default=None)
    _analysis_flags(rp)
    rp.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR even if it is not an earlier report (never an input or a folder holding one)")
    ho = sub.add_parser("handout", help="one offline HTML file: the recipe, scores with intervals, every figure")
    ho.add_argument("recipe")
    ho.add_argument("out", help="the .html file to write (an earlier handout there is replaced; nothing else)")
    ho.add_argument("--limit", type=count, default=30, help="items per suite for the scores (default 30)")
    ho.add_argument("--device", default="cpu")
    ho.add_argument("--cache-dir", default=None)
    lb = sub.add_parser("leaderboard", help="rank every method on the bundled family (dev-tuned, held-out scored)")
    lb.add_argument("--family", default=None, help="a family folder with vlm/, math/, base/, eval/ (default: the bundled one)")
    lb.add_argument("--out-dir", default="runs/leaderboard", help="where leaderboard.md/.json/.html go")
    lb.add_argument("--limit", type=count, default=None, help="held-out items per suite (default: all)")
    lb.add_argument("--dev-items", type=count, default=100, help="dev items per suite for tuning the knobs")
    lb.add_argument("--methods", nargs="*", default=None, help="only these methods (default: every one)")
    lb.add_argument("--grid-size", type=count, default=None, help="at most N grid points per method (default: all)")
    lb.add_argument("--tuned", nargs="+", default=None, metavar="DIR",
                    help="tune folders (`analysis tune --out DIR`): a row each, the tune's chosen point on held-out")
    lb.add_argument("--threads", type=count, default=1,
                    help="CPU threads (default 1: the toy models are too small to gain from more)")
    _knob_commands(sub)
    add_ask(sub)
    args = ap.parse_args(argv)
    return run(lambda: _dispatch(args), getattr(args, "out_dir", None) or getattr(args, "out", None))


def _analysis_flags(rp) -> None:
    """The report's flags, from the analysis registry: --NAME for a slow one, one flag per knob."""
    for name in analyses.names():
        a = analyses.get(name)
        if a.slow:
            rp.add_argument(f"--{name}", action="store_true", help=f"also run {a.title.lower()} ({a.slow})")
        for k in a.knobs:
            kw = {"int": {"type": count}, "text": {}, "images": {"nargs": "*"}}[k.kind]
            default = f"{k.lo}..{k.hi}, default {k.default}" if k.kind == "int" else f"default {k.default!r}"
            rp.add_argument(k.flag(name), dest=k.dest(name), default=None, **kw,
                            help=f"{a.title}: {k.label}" + ("" if k.kind == "images" else f" ({default})"))


def _knob_commands(sub) -> None:
    """sweep (one knob as a curve) and tune (a method's knobs searched on dev, optuna)."""
    sw = sub.add_parser("sweep", help="one knob of a recipe as accuracy curves with 95%% intervals")
    sw.add_argument("recipe")
    sw.add_argument("--knob", required=True)
    sw.add_argument("--values", required=True, help="comma-separated knob values, e.g. 0,0.25,0.5,1")
    sw.add_argument("--limit", type=count, default=None, help="items per suite (default: all)")
    sw.add_argument("--out", required=True, dest="out_dir", help="folder for sweep.json and the plot (atomic)")
    sw.add_argument("--device", default="cpu")
    sw.add_argument("--threads", type=count, default=1)
    tu = sub.add_parser("tune", help="search a method's knobs on the dev split (optuna, multi-objective)")
    tu.add_argument("--method", required=True)
    tu.add_argument("--trials", type=count, default=20, help="trials this run adds to the study (a rerun on DIR continues it)")
    tu.add_argument("--seconds", type=count, default=None, help="stop starting trials after this many seconds")
    tu.add_argument("--limit", type=count, default=50, help="dev items per suite each trial is scored on")
    tu.add_argument("--dev-items", type=count, default=100, help="dev split size per suite (as the leaderboard's)")
    tu.add_argument("--test-limit", type=count, default=None, help="held-out items per suite for the best point")
    tu.add_argument("--family", default=None, help="a family folder with vlm/, math/, base/, eval/ (default: bundled)")
    tu.add_argument("--out", required=True, dest="out_dir", help="the study's folder (resumable) and pareto.json")
    tu.add_argument("--threads", type=count, default=1)


def _dispatch(args) -> int:
    if args.cmd in ("sweep", "tune"):
        # lazy: both draw with plotly (0.22 s after torch) and tune imports optuna; `eval` needs neither.
        from analysis.sweep import main_sweep
        from analysis.tune import main_tune  # lazy: optuna (0.5 s), for tune only; see above

        return main_sweep(args) if args.cmd == "sweep" else main_tune(args)
    if args.cmd == "leaderboard":
        # lazy: it draws with plotly, 0.22 s after torch (python -X importtime); `--help` and `eval` do not.
        from analysis.leaderboard import main_leaderboard

        return main_leaderboard(args)
    if args.cmd == "eval":
        return main_eval(args)
    if args.cmd == "ask":
        return main_ask(args)
    if args.cmd == "handout":
        # lazy: plotly and the analyses, as for the report below.
        from analysis.handout import main_handout

        return main_handout(args)
    # lazy: the report draws with plotly too (analysis.figures, 0.22 s after torch).
    from analysis.report import main_report

    return main_report(args)


if __name__ == "__main__":
    sys.exit(main())
