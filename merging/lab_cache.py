"""Where the lab keeps its caches, and the one reader of their small JSON files.

Every cache (analyses, decompositions, file digests, learned gates) lives under one root:
$MERGE_LAB_CACHE, else ~/.cache/merge-lab. Several processes may share it (two app instances, a CLI
beside the app): files are written to a temp name and renamed, and read only as regular files, so a
FIFO or a device planted in the folder is a cache miss, never a hang.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

MAX_JSON = 1 << 20  # an alias, a record or a digest is a few hundred bytes


def root() -> Path:
    env = os.environ.get("MERGE_LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "merge-lab"


def read_json(path: Path):
    """The JSON value in `path`, or None when it is missing, not a regular file, too big or not JSON.
    The open never blocks (O_NONBLOCK, then fstat of the opened file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_JSON:
            return None
        try:
            return json.loads(f.read(MAX_JSON + 1))
        except (OSError, ValueError):
            return None
