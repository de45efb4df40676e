"""Compute the bundled family's knockout and leaderboard at the app's defaults and ship them.

    python -m tools.precompute [--only knockout|leaderboard] [--out assets/toy/precomputed] [--threads 1]

Each result is computed live by the app's own worker (webapp.worker.process.Worker, in this process,
on a fresh cache), with the arguments the app's panels send by default, then read back from that
cache under the key the app computes (so a key the job did not use is an error, not a wrong file)
and written as assets/toy/precomputed/<name>.json (analysis.precomputed): the key parts, the result,
the command, the date, the commit and the time it took. The other flags (smaller settings) are for
tests; a file made with them is served only to requests with those settings.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from analysis import analyses, precomputed
from analysis.cache import get_cache, make_key
from analysis.leaderboard_key import key_parts
from analysis.runner import Job
from merging import methods
from webapp.presets import REPO_ROOT, TOY_ROOT
from webapp.protocol import LEADERBOARD_LIMITS
from webapp.worker.process import Worker

TRIPLE = {"vlm": str(TOY_ROOT / "vlm"), "reasoner": str(TOY_ROOT / "math"), "base": str(TOY_ROOT / "base")}


class _Printer:
    """The worker's event queue: progress lines printed as they come."""

    def put(self, event) -> None:
        _, kind, payload = event
        if kind == "progress":
            done, total, message = payload
            print(f"[{done}/{total}] {message}", flush=True)


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return head or "unknown"


def _meta(t0: float, items: str, argv: list[str]) -> dict:
    return {"command": " ".join([precomputed.COMMAND, *argv]), "items": items, "commit": _commit(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "seconds": round(time.monotonic() - t0, 1),
            "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), load average "
                       f"{os.getloadavg()[0]:.1f} at the end"}


def knockout(worker: Worker, limit: int) -> dict:
    """The VLM's knockout as the Why-it-works tab asks it (no merge yet); its key parts."""
    worker.call("analysis", {"name": "knockout", "triple": TRIPLE, "recipe": None, "limit": limit, "live": True})
    a = analyses.get("knockout")
    job = Job((TRIPLE["vlm"], TRIPLE["reasoner"], TRIPLE["base"]), None, None, eval_dir=TOY_ROOT / "eval")
    return a.key(job, False, a.params({"limit": limit}))


def leaderboard_args(ns) -> dict:
    return {"methods": ns.methods or methods.names(), "limit": ns.limit, "dev_items": ns.dev_items,
            "grid_size": ns.grid_size, "live": True}


def run_one(worker: Worker, name: str, ns, out: Path, argv: list[str]) -> Path:
    t0 = time.monotonic()
    if name == "knockout":
        key = knockout(worker, ns.knockout_limit)
        items = f"{ns.knockout_limit} items per suite"
    else:
        args = leaderboard_args(ns)
        worker.call("leaderboard", args)
        key = key_parts(TOY_ROOT, {k: v for k, v in args.items() if k != "live"})
        items = f"{ns.limit} held-out and {ns.dev_items} dev items per suite, {ns.grid_size} grid points a method"
    data = get_cache(worker.cache_dir).get(make_key(name, key))
    if data is None:
        raise SystemExit(f"error: the worker's {name} result is not under the key the app computes; nothing written")
    path = precomputed.write(out, name, key, data, _meta(t0, items, argv))
    print(f"wrote {path} ({time.monotonic() - t0:.0f} s)", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog=precomputed.COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("knockout", "leaderboard"), default=None)
    ap.add_argument("--out", default=str(precomputed.FOLDER), help="folder of the JSON files")
    ap.add_argument("--knockout-limit", type=int, default=analyses.get("knockout").params({})["limit"])
    for k, (_, _, default) in LEADERBOARD_LIMITS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the toy models gain nothing from more, shared cores lose)")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    with tempfile.TemporaryDirectory(prefix="merge-lab-precompute-") as cache:
        worker = Worker(_Printer(), queue.Queue(), {"device": "cpu", "cache_dir": cache})
        for name in [ns.only] if ns.only else ["knockout", "leaderboard"]:
            run_one(worker, name, ns, Path(ns.out), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
