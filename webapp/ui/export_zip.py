"""An exported model folder as one zip the browser can download (UI side).

Written into a fresh temp folder (Gradio copies a returned file into its own cache and serves that
copy, so no folder of the lab's needs to be servable), complete or not at all. Stored, not
compressed: safetensors hardly compress and storing is as fast as copying. Folders over
MAX_BYTES stay a server path: a multi-GB model goes by disk or scp, not through a browser.
A VLM folder's zip always carries the lmms-eval task (merging.handoff), added to the zip when
the folder has none; the folder itself stays untouched.
The zips live in one temp folder per app process: each new export first deletes the zips older
than KEEP_S (Gradio copied them when the handler returned), and the folder goes when the process
exits, so exports never pile up in /tmp.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from merging import handoff

MAX_BYTES = 1 << 30
KEEP_S = 600.0
_folder: Path | None = None


def exports_folder() -> Path:
    """This process's folder of export zips (made on first use, removed at exit)."""
    global _folder
    if _folder is None or not _folder.is_dir():
        _folder = Path(tempfile.mkdtemp(prefix="merge-lab-exports-"))
        atexit.register(shutil.rmtree, _folder, True)
    return _folder


def _drop_old(folder: Path, keep_s: float) -> None:
    """Remove the earlier exports (one subfolder each) older than keep_s."""
    now = time.time()
    for old in folder.iterdir():
        try:
            if now - old.stat().st_mtime >= keep_s:
                shutil.rmtree(old)
        except OSError:
            pass  # already gone


def zip_for_download(folder: Path, max_bytes: int = MAX_BYTES, keep_s: float = KEEP_S) -> tuple[Path | None, str]:
    """(the zip's path, "") or (None, why there is no download)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    if size > max_bytes:
        return None, f"It is {size / 2**30:.1f} GiB, over the {max_bytes / 2**30:.0f} GiB a browser download is offered for."
    where = exports_folder()
    _drop_old(where, keep_s)
    out = Path(tempfile.mkdtemp(dir=where)) / f"{folder.name}.zip"  # the name the browser saves it under
    part = out.with_name(f".{out.name}.part")
    with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for p in files:
            z.write(p, f"{folder.name}/{p.relative_to(folder).as_posix()}")
        for name, text in missing_handoff(folder).items():
            z.writestr(f"{folder.name}/{name}", text)
    os.replace(part, out)
    return out, ""


def missing_handoff(folder: Path) -> dict[str, str]:
    """The lmms-eval task files a VLM folder lacks (relative path -> text); none for other folders."""
    if handoff.vlm_model_type(folder) is None:
        return {}
    return {name: text for name, text in handoff.lmms_eval_files().items() if not (folder / name).exists()}
