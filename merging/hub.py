"""Turn a recipe's model reference (local folder or hub id) into a local folder.

Hub ids resolve through the local Hugging Face cache only: the lab never downloads behind the
user's back, and offline a missing id is a clear error naming it. `resolve` (the CLI's rule)
takes an existing local folder first; `resolve_hub_id` never looks outside the cache, for callers
(the app with --models-root) where a relative `owner/name` must not open a folder of the working
directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants

from merging.errors import LabError

# owner/name of letters, digits, "_", "-", "."; "--" and ".." are refused as huggingface_hub does
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*$")


def shown(ref: str, limit: int = 120) -> str:
    """A model reference as messages show it: a very long one cut, with its length (a 5000-character
    name echoed whole buries the message)."""
    ref = str(ref)
    return ref if len(ref) <= limit else f"{ref[:limit - 40]}…{ref[-20:]} ({len(ref):,} characters)"


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and ".." not in ref and "--" not in ref


def resolve(ref: str | Path) -> Path:
    """Local folder for ref. Raises LabError naming ref when it cannot be found."""
    ref_s = str(ref)
    p = Path(ref_s).expanduser()
    try:
        here = p.exists()
    except OSError as e:  # a name too long for the file system
        raise LabError(f"model folder not found: {shown(ref_s)} ({e.strerror})") from None
    if here:
        if not p.is_dir():
            raise LabError(f"{shown(ref_s)} is a file; a model is a folder with config.json and *.safetensors")
        return p.resolve()
    if not looks_like_hub_id(ref_s):
        raise LabError(f"model folder not found: {shown(ref_s)}")
    return resolve_hub_id(ref_s)


def hub_cache() -> Path:
    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def resolve_hub_id(repo_id: str) -> Path:
    """The snapshot folder of repo_id in the local Hugging Face cache, and nowhere else."""
    if not looks_like_hub_id(repo_id):
        raise LabError(f"{shown(repo_id)!r} is not a hub id (owner/name)")
    try:
        # Every checkpoint, local folders too, is resolved here; only a hub id gets this far.
        # lazy: huggingface_hub's download code costs 0.3 s after torch (python -X importtime).
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache()))
    except Exception:  # LocalEntryNotFoundError, offline mode, bad id: all mean "not here"
        raise LabError(
            f"{repo_id} is not in the local Hugging Face cache and the lab does not download; "
            f"fetch it first (hf download {repo_id}) or give a local folder"
        ) from None
    # refs/main is a file in the cache; a doctored one must not lead the snapshot out of it
    if not Path(os.path.realpath(folder)).is_relative_to(hub_cache()):
        raise LabError(f"{repo_id}: its cache entry leads outside the Hugging Face cache {hub_cache()}; refused")
    return folder
