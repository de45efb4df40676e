"""`python -m merging check RECIPE`, `merge RECIPE OUT_DIR [--device cpu|cuda]`, `drift RECIPE OUT_DIR`.

Exit 0 on success; exit 2 with a one-line reason on stderr for bad input.
"""

import argparse
import signal
import sys
from pathlib import Path

from merging.errors import LabError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m merging", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("check", help="compatibility report of the recipe's triple; writes nothing")
    ck.add_argument("recipe")
    mg = sub.add_parser("merge", help="merge the recipe into a Hugging Face model folder")
    mg.add_argument("recipe")
    mg.add_argument("out_dir")
    mg.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    mg.add_argument("--max-shard-size", default="2GB", help="output shard size, e.g. 500MB, 2GB (default 2GB)")
    mg.add_argument("--no-progress", action="store_true", help="no progress bar")
    mg.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (atomically)")
    dr = sub.add_parser("drift", help="short fine-tune of the VLM with DRIFT's reasoning prior (recipe drift: section)")
    dr.add_argument("recipe")
    dr.add_argument("out_dir")
    dr.add_argument("--device", default="cpu")
    dr.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    interrupted = []

    def on_sigint(signum, frame):
        # Remember it: a Ctrl-C that lands inside native code (torch, the safetensors reader)
        # can come back as another exception type; it is still an interrupt, not a bug.
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if args.cmd == "check":
            from merging.compat import main_check

            return main_check(args)
        if args.cmd == "drift":
            from merging.finetune import main_drift

            return main_drift(args)
        from merging.engine import main_merge

        return main_merge(args)
    except LabError as e:
        if interrupted:
            return _interrupted(args)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        if not interrupted:
            raise
        return _interrupted(args)
    except KeyboardInterrupt:
        return _interrupted(args)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(args) -> int:
    out = getattr(args, "out_dir", None)
    done = out is not None and (Path(out) / "config.json").exists()
    # The output folder appears atomically: either it is complete or it is not there at all.
    print(f"error: interrupted; {'the output ' + str(out) + ' was already complete' if done else 'nothing was written'}",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
