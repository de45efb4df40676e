"""`python -m analysis eval MODEL_DIR [--suite NAME]` and `python -m analysis report RECIPE OUT_DIR`.

Exit 0 on success, 2 with a one-line reason on stderr for bad input, 130 on SIGINT (143 on SIGTERM).
"""

import sys

from merging.cli import Parser, count, run


def main(argv=None) -> int:
    ap = Parser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="accuracy of a model folder on the toy suites, as JSON")
    ev.add_argument("model_dir")
    ev.add_argument("--suite", default=None, help="perception, visual_math or text_math (default: all)")
    ev.add_argument("--limit", type=count, default=None, help="evaluate only the first N items of each suite")
    ev.add_argument("--device", default="cpu")
    rp = sub.add_parser("report", help="every analysis figure as HTML plus the numbers as JSON")
    rp.add_argument("recipe")
    rp.add_argument("out_dir")
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--cache-dir", default=None)
    rp.add_argument("--knockout", action="store_true", help="also run layer knockout (one evaluation per layer and module)")
    rp.add_argument("--knockout-limit", type=count, default=20, help="eval items per suite in knockout")
    rp.add_argument("--images", nargs="*", default=None, help="images for attention decay (default: bundled samples)")
    rp.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR even if it is not an earlier report (never an input or a folder holding one)")
    args = ap.parse_args(argv)
    return run(lambda: _dispatch(args), getattr(args, "out_dir", None))


def _dispatch(args) -> int:
    if args.cmd == "eval":
        from analysis.evaluate import main_eval

        return main_eval(args)
    from analysis.report import main_report

    return main_report(args)


if __name__ == "__main__":
    sys.exit(main())
