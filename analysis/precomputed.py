"""Results shipped with the bundled family (assets/toy/precomputed/*.json), served like cache entries.

A class of users opening the knockout or the leaderboard at the app's defaults would each wait minutes
for the same numbers; `python -m tools.precompute` computes them once through the app's own worker and
writes one file per result. Each file holds the cache key parts of the live computation (checkpoint
fingerprints, i.e. file digests, the eval suites' digest and every setting), the key made from them
(analysis.cache.make_key, so a schema bump refuses it too) and the result exactly as the live path
caches it, with how it was made. A file is served only for a request whose key is its key: other
weights, eval items or settings are computed live.
"""

from __future__ import annotations

import json
from pathlib import Path

from analysis.cache import make_key
from analysis.evaluate import EVAL_DIR
from merging import lab_cache
from merging.output_folder import AtomicFile

FOLDER = EVAL_DIR.parent / "precomputed"
COMMAND = "python -m tools.precompute"


def entry(name: str, key_parts, data: dict, meta: dict) -> dict:
    """A shipped file's content: the key parts, their key, how it was made (meta) and the data."""
    return {**meta, "name": name, "key": make_key(name, key_parts), "key_parts": key_parts, "data": data}


def write(folder: Path, name: str, key_parts, data: dict, meta: dict) -> Path:
    """Write (or replace an earlier) `<folder>/<name>.json` atomically; its first key names the command
    (the mark that lets a later run replace it)."""
    path = Path(folder) / f"{name}.json"
    with AtomicFile(path, f'"command": "{COMMAND}') as tmp:
        # keys in the live result's order (a summary lists a dict's suites in it), never sorted
        tmp.write_text(json.dumps(entry(name, key_parts, data, {"command": COMMAND, **meta}), indent=1) + "\n")
    return path


def find(name: str, key_parts, folder: Path | None = None) -> dict | None:
    """The shipped entry of `name` whose key is the key of `key_parts` (a fresh copy), else None.
    The file's own key must also be the key of the parts it lists, so an edited file is refused."""
    key = make_key(name, key_parts)
    for path in sorted(Path(folder or FOLDER).glob("*.json")):
        e = lab_cache.read_json(path)
        if (isinstance(e, dict) and e.get("name") == name and e.get("key") == key and isinstance(e.get("data"), dict)
                and make_key(name, e.get("key_parts")) == key):
            return e
    return None


def mark(e: dict) -> str:
    """The line shown above a served result: what it is, its items, how and when it was made."""
    return (f"**Precomputed** for the bundled family ({e['items']}; `{e['command']}`, {e['date']}, "
            f"{e['seconds']:.0f} s), filed under the key of a live run at these settings")
