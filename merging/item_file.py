"""A JSONL of image + question + answer items, checked whole before any model loads: a user's own
eval set (`python -m analysis eval MODEL --suite-file items.jsonl`, the app's Evaluate upload) and
DRIFT's training data (the recipe's `drift: data:`, the app's DRIFT upload). It lives in merging so
that DRIFT may read it; analysis.eval_file re-exports it.

One item a line: {"question": str, "answer": str, "image": "path/inside/the/folder.png" (optional),
"id": str or int (optional)}; other keys are ignored (the bundled suites also carry "target"), blank
lines are skipped. An image path is relative to the JSONL's folder and must stay inside it: absolute
paths, `..` and links that resolve outside are refused, and only the header of each image is read
until the items are used. Every refusal is one LabError naming the file, the line and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from merging.errors import LabError

MAX_ITEMS = 5000
MAX_FILE_BYTES = 8 * 2**20  # the JSONL itself
MAX_QUESTION_CHARS = 2000
MAX_ANSWER_CHARS = 200
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_SIDE = 4096


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n:,} bytes"


class ItemError(Exception):
    """What is wrong with one line; read_items adds the file and the line number."""


def _text(obj: dict, key: str, limit: int) -> str:
    if key not in obj or obj[key] is None:
        raise ItemError(f'"{key}" is missing')
    v = obj[key]
    if not isinstance(v, str):
        hint = f' (write "{v}", not {v})' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
        raise ItemError(f'"{key}" must be a string, not {type(v).__name__}{hint}')
    if not v.strip():
        raise ItemError(f'"{key}" is empty')
    if len(v) > limit:
        raise ItemError(f'"{key}" is {len(v):,} characters long; the limit is {limit:,}')
    return v.strip()


def image_header(path: Path) -> tuple[int, int]:
    """(width, height) from the header of an image file that is small enough; ItemError otherwise."""
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ItemError(f"image {path.name} is {_size(size)}; the limit is {_size(MAX_IMAGE_BYTES)}")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ItemError(f"image {path.name} would decode to too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ItemError(f"image {path.name} is not a readable image (PNG, JPEG, WebP, GIF, ...)") from None
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise ItemError(f"image {path.name} is {w}x{h} px; the limit is {MAX_IMAGE_SIDE} px a side")
    return w, h


def image_path(ref, root: Path, by_name: bool = False) -> Path:
    """The file an item's "image" names, inside root (links resolved); ItemError when it is not.
    by_name: look the file up by its last part only (images uploaded one by one, without folders)."""
    if not isinstance(ref, str):
        raise ItemError(f'"image" must be a path string or null, not {type(ref).__name__}')
    if not ref.strip() or any(ord(c) < 32 for c in ref):
        raise ItemError('"image" is empty or holds control characters')
    p = PurePosixPath(ref.replace("\\", "/"))
    if p.is_absolute() or Path(ref).is_absolute() or (p.parts and p.parts[0].endswith(":")):
        raise ItemError(f'"image" {ref!r} is an absolute path; give it relative to the JSONL\'s folder')
    if ".." in p.parts:
        raise ItemError(f'"image" {ref!r} goes up out of the JSONL\'s folder (..)')
    path = root / (p.name if by_name else Path(*p.parts))
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(root)):
        raise ItemError(f'"image" {ref!r} is a link that leads out of the JSONL\'s folder')
    if not real.is_file():
        raise ItemError(f'"image" {ref!r} is not there' + (" (upload it with the JSONL)" if by_name else ""))
    image_header(real)
    return real


def parse_item(line: str, root: Path, by_name: bool = False) -> dict:
    """One line's item: {"id", "question", "answer", "image_path" (Path or None)}; ItemError when bad."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ItemError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ItemError(f"not a JSON object but {type(obj).__name__}")
    item = {"question": _text(obj, "question", MAX_QUESTION_CHARS), "answer": _text(obj, "answer", MAX_ANSWER_CHARS)}
    ident = obj.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise ItemError(f'"id" must be a string or a whole number, not {type(ident).__name__}')
    item["id"] = None if ident is None else str(ident)[:100]
    ref = obj.get("image")
    item["image_path"] = None if ref is None else image_path(ref, root, by_name)
    return item


def _lines(path: Path, name: str):
    """(line number, text) of a JSONL file that is small enough and UTF-8."""
    if not path.is_file():
        raise LabError(f"{name}: no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LabError(f"{name}: {_size(size)}; the limit is {_size(MAX_FILE_BYTES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        n = path.read_bytes()[: e.start].count(b"\n") + 1
        raise LabError(f"{name} line {n}: not UTF-8 text") from None
    except OSError as e:
        raise LabError(f"{name}: could not be read ({e.strerror})") from None
    return enumerate(text.splitlines(), start=1)


def read_items(path: str | Path, limit: int | None = None, by_name: bool = False, name: str | None = None) -> list[dict]:
    """Every item of the file checked (check_items), then the first `limit` of them with their images
    opened ("pil")."""
    name = name or str(path)
    items = check_items(path, by_name, name)
    return open_images(items[:limit] if limit is not None else items, name)


def check_items(path: str | Path, by_name: bool = False, name: str | None = None) -> list[dict]:
    """Every item of the file checked (JSON, fields, types, image paths and headers; no pixels decoded).
    name: how messages call the file (default: its path)."""
    path = Path(path)
    name = name or str(path)
    root = path.parent
    items: list[dict] = []
    for n, line in _lines(path, name):
        if not line.strip():
            continue
        if len(items) >= MAX_ITEMS:
            raise LabError(f"{name} line {n}: more than {MAX_ITEMS:,} items; split the file")
        try:
            item = parse_item(line, root, by_name)
        except ItemError as e:
            raise LabError(f"{name} line {n}: {e}") from None
        item["line"] = n
        item["id"] = item["id"] or f"line-{n}"
        items.append(item)
    if not items:
        raise LabError(f"{name}: no items (one JSON object a line, with \"question\" and \"answer\")")
    return items


def open_images(items: list[dict], name: str) -> list[dict]:
    for it in items:
        if it["image_path"] is None:
            continue
        try:
            with Image.open(it["image_path"]) as im:
                it["pil"] = im.convert("RGB")
        except Exception as e:  # the header was fine, the pixels are not
            raise LabError(f"{name} line {it['line']}: image {it['image_path'].name} could not be decoded "
                           f"({type(e).__name__})") from None
    return items


def data_digest(jsonl: Path, items: list[dict]) -> str:
    """sha256 of the JSONL's bytes and of each image it names, in line order: one changed byte
    anywhere makes another run, and the same files uploaded again the same run."""
    h = hashlib.sha256(jsonl.read_bytes())
    for it in items:
        if it["image_path"] is not None:
            with open(it["image_path"], "rb") as f:
                h.update(f"\n{it['line']}:".encode() + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_set_digests: dict[str, tuple] = {}  # JSONL path -> (its stamp, (image, stamp) of each image, digest)


def set_digest(path: str | Path) -> str:
    """data_digest of a whole JSONL set (every line checked first). A merge key asks for it at every
    chat turn, so it is computed again only when the JSONL or one of its images changed on disk."""
    path = Path(path)
    known = _set_digests.get(str(path))
    try:
        if known and known[0] == _stamp(path) and all(_stamp(i) == s for i, s in known[1]):
            return known[2]
    except OSError:
        pass  # a file gone: checked (and refused) below
    items = check_items(path)
    images = tuple((it["image_path"], _stamp(it["image_path"])) for it in items if it["image_path"] is not None)
    stamp = _stamp(path)
    digest = data_digest(path, items)
    _set_digests[str(path)] = (stamp, images, digest)
    return digest
