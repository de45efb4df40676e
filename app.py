"""The merge lab in the browser: `python app.py` serves the bundled toy family at http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
import os
import sys
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
    args = ap.parse_args(argv)
    if args.auth and ":" not in args.auth:
        ap.error("--auth must be USER:PASS")
    if args.models_root and not Path(args.models_root).expanduser().is_dir():
        ap.error(f"--models-root {args.models_root} is not a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_dir = Path(args.cache_dir or Path.home() / ".cache" / "merge-lab").expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth:
        print(f"WARNING: listening on {args.host} without --auth: anyone who can reach this machine "
              "can use the app (and its GPU). Add --auth USER:PASS.", file=sys.stderr)

    from webapp.client import WorkerClient
    from webapp.lab import Lab
    from webapp.ui import CSS, build, theme

    client = WorkerClient({"device": args.device, "cache_dir": str(cache_dir), "threads": args.threads})
    client.start()
    lab = Lab(client, cache_dir, args.models_root, args.device)
    demo = build(lab)
    demo.queue(default_concurrency_limit=16)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below: stop the worker
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                    allowed_paths=[str(cache_dir)], theme=theme(), css=CSS, show_error=True,
                    footer_links=[])
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
