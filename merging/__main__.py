"""`python -m merging check RECIPE`, `plan RECIPE`, `merge RECIPE OUT_DIR [--device cpu|cuda]`, `drift RECIPE OUT_DIR`.

Exit 0 on success; exit 2 with a one-line reason on stderr for bad input; 130 on SIGINT (143 on
SIGTERM), with the output either complete or as it was (merging/cli.py).
"""

import sys

from merging.cli import Parser, run


def main(argv=None) -> int:
    ap = Parser(prog="python -m merging", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("check", help="compatibility report of the recipe's triple; writes nothing")
    ck.add_argument("recipe")
    pl = sub.add_parser("plan", help="where the app's worker would keep the triple's pieces (memory plan); loads nothing")
    pl.add_argument("recipe")
    pl.add_argument("--device", default="cpu", help="cpu or cuda: plan for this machine's device (default cpu)")
    pl.add_argument("--cpu-dtype", default="float32", choices=("float32", "bfloat16"))
    pl.add_argument("--gpu-gib", type=float, default=None, help="plan for a card of this many GiB instead")
    pl.add_argument("--host-gib", type=float, default=None, help="with --gpu-gib: free host RAM (default 48)")
    mg = sub.add_parser("merge", help="merge the recipe into a Hugging Face model folder")
    mg.add_argument("recipe")
    mg.add_argument("out_dir")
    mg.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    mg.add_argument("--max-shard-size", default="2GB", help="output shard size, e.g. 500MB, 2GB (default 2GB)")
    mg.add_argument("--no-progress", action="store_true", help="no progress bar")
    mg.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR if it exists (atomically; never an input or a folder holding one)")
    dr = sub.add_parser("drift", help="short fine-tune of the VLM with DRIFT's reasoning prior (recipe drift: section)")
    dr.add_argument("recipe")
    dr.add_argument("out_dir")
    dr.add_argument("--device", default="cpu")
    dr.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    return run(lambda: _dispatch(args), getattr(args, "out_dir", None))


def _dispatch(args) -> int:
    # Each command's module imports torch (2.1 s, python -X importtime); `--help` and a usage error
    # answer in 0.07 s without it, so each is imported only for its own command.
    if args.cmd == "check":
        from merging.compat import main_check  # lazy: torch, 2.1 s (see above)

        return main_check(args)
    if args.cmd == "plan":
        from merging.memory_plan import main_plan  # lazy: torch, 2.1 s (see above)

        return main_plan(args)
    if args.cmd == "drift":
        from merging.finetune import main_drift  # lazy: torch, 2.1 s (see above)

        return main_drift(args)
    from merging.engine import main_merge  # lazy: torch, 2.1 s (see above)

    return main_merge(args)


if __name__ == "__main__":
    sys.exit(main())
