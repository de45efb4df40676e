"""An uploaded eval set, a JSONL with its images or one .zip holding both, gathered into a fresh folder
of this server's upload folder for analysis.eval_file to check (UI side).

Every uploaded path is checked with safety.uploaded before it is opened. Gradio keeps each upload
in its own folder, so files given one by one are copied side by side and the JSONL's image paths
are matched by file name (`by_name`); a zip keeps its folders. A zip member is written only when it
is a plain file whose name stays inside the folder (no absolute names, no `..`, no links), within
caps on the member count and the unpacked bytes. A staged folder lives only while its job runs
(unstage), and all staged folders together stay under MAX_STAGED, so uploads never fill the disk.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from analysis.eval_file import MAX_FILE_BYTES, MAX_IMAGE_BYTES, MAX_ITEMS
from merging.errors import LabError
from merging.hub import shown as shown_name
from webapp.safety import uploaded

MAX_MEMBERS = MAX_ITEMS + 100
MAX_UNPACKED = 256 * 2**20  # one upload, unpacked
MAX_STAGED = 1024 * 2**20  # every set staged on this server at once (all sessions)
MAX_DEPTH = 16  # folders in a member's path: an eval set needs one or two; the file system's limit is far off
MAX_NAME = 255  # characters in a member's path, as messages would echo it
PREFIX = "eval-set-"


@dataclass(frozen=True)
class EvalSet:
    jsonl: Path  # inside folder
    by_name: bool  # image paths are looked up by their file name (files uploaded one by one)
    name: str  # how messages call the JSONL: its name as uploaded (never a server path)


def _is_jsonl(name: str) -> bool:
    return name.lower().endswith((".jsonl", ".json"))


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's name inside the folder; None for a folder entry; LabError when it may not be written."""
    name = shown_name(info.filename.replace("\\", "/"), 80)
    p = PurePosixPath(info.filename.replace("\\", "/"))
    if len(p.parts) > MAX_DEPTH + 1:
        raise LabError(f"zip refused: {name} is {len(p.parts) - 1} folders deep; at most {MAX_DEPTH}")
    if len(info.filename) > MAX_NAME:
        raise LabError(f"zip refused: {name} is a path of {len(info.filename):,} characters; at most {MAX_NAME}")
    if info.flag_bits & 0x1:  # zipfile would raise RuntimeError asking for a password
        raise LabError(f"zip refused: {name} is encrypted; zip the set without a password")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise LabError(f"zip refused: {name} is a link")
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise LabError(f"zip refused: {name} points outside the archive's folder")
    if info.is_dir() or p.parts[:1] == ("__MACOSX",):
        return None
    if info.file_size > max(MAX_FILE_BYTES, MAX_IMAGE_BYTES):
        raise LabError(f"zip refused: {name} unpacks to {info.file_size / 2**20:.1f} MB")
    return p


def _unzip(zpath: str, folder: Path, shown: str) -> EvalSet:
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError):
        raise LabError(f"{shown} is not a zip archive") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise LabError(f"zip refused: {len(infos):,} files; the limit is {MAX_MEMBERS:,}")
        members = [(i, p) for i in infos if (p := _member_path(i)) is not None]
        if sum(i.file_size for i, _ in members) > MAX_UNPACKED:
            raise LabError(f"zip refused: it unpacks to more than {MAX_UNPACKED // 2**20} MB, the cap for one upload")
        jsonls = [p for _, p in members if _is_jsonl(p.name)]
        if len(jsonls) != 1:
            raise LabError(f"{shown}: the zip holds {len(jsonls)} .jsonl files; put exactly one in it")
        for info, p in members:
            dest = folder.joinpath(*p.parts)
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 2**20)
            except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:  # a name clash, a bad CRC,
                # a compression method or an encryption zipfile cannot read
                raise LabError(f"zip refused: {p} could not be unpacked ({type(e).__name__})") from None
    return EvalSet(folder.joinpath(*jsonls[0].parts), False, str(jsonls[0]))


def _side_by_side(paths: list[str], folder: Path) -> EvalSet:
    jsonls = [p for p in paths if _is_jsonl(p)]
    if len(jsonls) != 1:
        raise LabError(f"upload exactly one .jsonl file with its images ({len(jsonls)} given), or one .zip")
    names: set[str] = set()
    for p in paths:
        name = Path(p).name
        if name in names:
            raise LabError(f"two uploaded files are called {name}; rename one, or upload a .zip with folders")
        names.add(name)
        shutil.copyfile(p, folder / name)
    return EvalSet(folder / Path(jsonls[0]).name, True, Path(jsonls[0]).name)


def stage(paths: list[str], roots: list[Path], upload_dir: Path) -> EvalSet:
    """The uploads as one eval-set folder inside upload_dir; LabError for what cannot be used."""
    if not paths:
        raise LabError("upload a .jsonl file and its images, or one .zip holding both")
    if len(paths) > MAX_MEMBERS:
        raise LabError(f"{len(paths):,} files; the limit is {MAX_MEMBERS:,}")
    checked = [uploaded(p, roots) for p in paths]
    zips = [p for p in checked if p.lower().endswith(".zip")]
    if zips and len(checked) > 1:
        raise LabError("upload either one .zip or a .jsonl with its images, not both")
    staged = staged_bytes(upload_dir)
    if staged >= MAX_STAGED:
        raise LabError(f"the server already holds {staged / 2**20:.0f} MB of uploaded sets being used; the cap is "
                       f"{MAX_STAGED // 2**20} MB for all of them: try again when those jobs end")
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=upload_dir))
    try:
        if zips:
            es = _unzip(zips[0], folder, Path(zips[0]).name)
        else:
            es = _side_by_side(checked, folder)
        if staged + _size(folder) > MAX_STAGED:
            raise LabError(f"the server's uploaded sets would exceed their cap of {MAX_STAGED // 2**20} MB with "
                           "this one: try again when the jobs using the others end")
        return es
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def staged_bytes(upload_dir: Path) -> int:
    """Bytes of every set staged in upload_dir now."""
    return sum(_size(d) for d in Path(upload_dir).glob(f"{PREFIX}*") if d.is_dir())


def unstage(upload_dir: Path, jsonl: Path | str) -> None:
    """Remove the folder stage() made for the set whose JSONL is `jsonl` (it may sit deeper in it,
    as in its zip)."""
    top = Path(jsonl).relative_to(upload_dir).parts[0]
    if top.startswith(PREFIX):
        shutil.rmtree(Path(upload_dir) / top, ignore_errors=True)
