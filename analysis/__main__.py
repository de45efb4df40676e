"""`python -m analysis eval MODEL_DIR [--suite NAME]` and `python -m analysis report RECIPE OUT_DIR`."""

import argparse
import sys

from merging.errors import LabError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="accuracy of a model folder on the toy suites, as JSON")
    ev.add_argument("model_dir")
    ev.add_argument("--suite", default=None, help="perception, visual_math or text_math (default: all)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each suite")
    ev.add_argument("--device", default="cpu")
    rp = sub.add_parser("report", help="every analysis figure as HTML plus the numbers as JSON")
    rp.add_argument("recipe")
    rp.add_argument("out_dir")
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--cache-dir", default=None)
    rp.add_argument("--knockout", action="store_true", help="also run layer knockout (one evaluation per layer and module)")
    rp.add_argument("--knockout-limit", type=int, default=20, help="eval items per suite in knockout")
    rp.add_argument("--images", nargs="*", default=None, help="images for attention decay (default: bundled samples)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "eval":
            from analysis.evaluate import main_eval

            return main_eval(args)
        from analysis.report import main_report

        return main_report(args)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
