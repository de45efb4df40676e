"""The merge lab in the browser: `python app.py` serves the bundled toy family at http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where the worker merges and generates (auto: CUDA when available)")
    ap.add_argument("--cache-dir", default=None, help="analysis cache, recipes and exports (default ~/.cache/merge-lab)")
    ap.add_argument("--models-root", default=None, help="custom model folders must be inside this folder")
    ap.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    ap.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the worker")
    ap.add_argument("--cpu-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype the worker serves models in on the CPU (bfloat16 halves the memory; "
                         "a GPU always serves the checkpoint's own dtype)")
    ap.add_argument("--max-memory-gib", type=float, default=None,
                    help="host RAM the worker may plan to use at most (default: whatever is free)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let models run their own Python code (config auto_map) when loaded; off by default")
    args = ap.parse_args(argv)
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user.strip() or not password:
            # an empty user or password would lock everyone out (or let anyone in): refuse it
            ap.error("--auth must be USER:PASS with a non-empty user and password")
    if args.models_root and not Path(args.models_root).expanduser().is_dir():
        ap.error(f"--models-root {args.models_root} is not a folder")
    return args


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warnings(host: str, auth: str | None, share: bool = False,
                      trust_remote_code: bool = False) -> list[str]:
    """What to tell the operator about who can reach the app and what it may run."""
    out = []
    if host not in LOOPBACK and not auth:
        out.append(f"WARNING: listening on {host} without --auth: anyone who can reach this machine "
                   "can use the app (and its GPU). Add --auth USER:PASS.")
    if share and not auth:
        out.append("WARNING: --share without --auth: anyone with the public link can use the app. "
                   "Add --auth USER:PASS.")
    if trust_remote_code:
        out.append("WARNING: --trust-remote-code: loading a model may run Python code that came with it.")
    return out


def private_upload_dir() -> Path:
    """A fresh folder (mode 0700) for this server's uploads. Gradio's default, /tmp/gradio, is shared by
    every Gradio app on the machine, and anything in the upload folder counts as uploaded by a user."""
    base = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="merge-lab-uploads-", dir=base)).resolve()


def file_access(cache_dir: Path) -> dict[str, list[str]]:
    """launch()'s allowed_paths and blocked_paths: what /gradio_api/file= may serve from the cache folder.

    Nothing: downloads (recipes) are written to fresh temp folders and served from Gradio's own copy;
    never the cache root, which holds the analysis database, exports and DRIFT results. Those are also
    blocked, since Gradio would otherwise serve a file returned from the working or temp directory."""
    blocked = [str(cache_dir / n) for n in ("exports", "drift", "cache.db", "cache.db-wal", "cache.db-shm")]
    blocked += [p for p in os.environ.get("GRADIO_BLOCKED_PATHS", "").split(",") if p.strip()]
    return {"allowed_paths": [], "blocked_paths": blocked}


def serve(args: argparse.Namespace, cache_dir: Path, upload_dir: Path) -> None:
    # Not at the top: gradio must load after main() sets GRADIO_TEMP_DIR, `python app.py --help` answers
    # in 0.07 s, and the spawned worker runs this file's top level again (as __mp_main__).
    # lazy, the four below (python -X importtime): gradio 4.6 s (torch 2.1 s through the method registry); PIL 0.04 s.
    from starlette.middleware import Middleware  # lazy: with gradio below, 0.01 s

    from webapp.safety import UPLOAD_LIMIT, RefuseLongURLs, limit_pil  # lazy: PIL, 0.04 s
    from webapp.ui.client import WorkerClient  # lazy: multiprocessing, 0.05 s
    from webapp.ui.lab import Lab  # lazy: gradio (gradio.utils), 4.6 s
    from webapp.ui.page import CSS, build, theme  # lazy: gradio, 4.6 s

    limit_pil()
    client = WorkerClient({"device": args.device, "cache_dir": str(cache_dir), "threads": args.threads,
                           "trust_remote_code": args.trust_remote_code, "cpu_dtype": args.cpu_dtype,
                           "max_memory_gib": args.max_memory_gib})
    client.start()
    try:
        lab = Lab(client, cache_dir, args.models_root, args.device, upload_dir)
        demo = build(lab)
        demo.queue(default_concurrency_limit=16)
        auth = tuple(args.auth.split(":", 1)) if args.auth else None
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below: stop the worker
        # show_error off: every message of the lab reaches the page through a status line, so an
        # exception that reaches Gradio is Gradio's own refusal, which would name the server's folders.
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                    theme=theme(), css=CSS, show_error=False, footer_links=[], max_file_size=UPLOAD_LIMIT,
                    app_kwargs={"middleware": [Middleware(RefuseLongURLs)]},
                    **file_access(cache_dir))
    finally:
        client.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_dir = Path(args.cache_dir or Path.home() / ".cache" / "merge-lab").expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    for line in exposure_warnings(args.host, args.auth, args.share, args.trust_remote_code):
        print(line, file=sys.stderr, flush=True)
    upload_dir = private_upload_dir()
    os.environ["MERGE_LAB_CACHE"] = str(cache_dir)  # the worker's merges and the analyses share decompositions
    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir)  # before gradio is imported: uploads and served copies
    try:
        serve(args, cache_dir, upload_dir)
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
