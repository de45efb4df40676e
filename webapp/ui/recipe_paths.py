"""A recipe as a user downloads it: no path of the server's file system in it.

Each model becomes a hub id (a snapshot in the local Hugging Face cache), a path relative to the
app's --models-root, or a path relative to the lab's own folder (the bundled family); a comment
at the top says where the relative ones start, so `python -m merging merge recipe.yaml OUT` works
when run from there. Only a folder outside all three (a custom triple typed without a models root)
keeps its absolute path: the person running the server typed it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from merging.layout import ROLES
from webapp.presets import REPO_ROOT as LAB_ROOT

SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
RUN = "# Run it with: python -m merging merge recipe.yaml OUT_DIR"


def portable_ref(ref: str, models_root: str | None) -> tuple[str, str | None]:
    """(the reference to write, what it is relative to: "models root", "lab", or None)."""
    hub = SNAPSHOT.search(ref.replace("\\", "/"))
    if hub:
        return f"{hub['org']}/{hub['name']}", None
    path = Path(ref)
    if not path.is_absolute():
        return ref, None  # a hub id, or already relative
    for base, where in ((models_root, "models root"), (LAB_ROOT, "lab")):
        if base and path.resolve().is_relative_to(Path(base).resolve()):
            return path.resolve().relative_to(Path(base).resolve()).as_posix(), where
    return ref, None


def portable_yaml(recipe: dict, models_root: str | None) -> str:
    """The recipe's YAML for download and display, its model references made portable."""
    out, bases = dict(recipe), []
    for role in ROLES:
        if out.get(role):
            out[role], where = portable_ref(str(out[role]), models_root)
            if where and where not in bases:
                bases.append(where)
    notes = {"models root": "# Model paths are relative to the app's models root: run the command from that folder.",
             "lab": "# Model paths are relative to the merge lab's folder: run the command from there."}
    header = "\n".join([RUN, *(notes[b] for b in bases)])
    return f"{header}\n{yaml.safe_dump(out, sort_keys=False)}"
