"""Turn a recipe's model reference (local folder or hub id) into a local folder.

Hub ids resolve through the local Hugging Face cache only: the lab never downloads behind the
user's back, and offline a missing id is a clear error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

from merging.errors import LabError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def resolve(ref: str | Path) -> Path:
    """Local folder for ref. Raises LabError naming ref when it cannot be found."""
    ref_s = str(ref)
    p = Path(ref_s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LabError(f"{ref_s} is a file; a model is a folder with config.json and *.safetensors")
        return p.resolve()
    if not looks_like_hub_id(ref_s):
        raise LabError(f"model folder not found: {ref_s}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(ref_s, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, offline mode, bad id: all mean "not here"
        raise LabError(
            f"{ref_s} is not in the local Hugging Face cache and the lab does not download; "
            f"fetch it first (hf download {ref_s}) or give a local folder"
        ) from None
    return Path(folder)
