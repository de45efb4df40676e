"""Checks on what a user can hand the app: uploaded images and typed questions (UI and worker side).

A file a request names is read only when it lies in this server's upload folder or the models root
(`uploaded`); the check comes before anything opens the file, so a named server path is never read.

Every refusal is a LabError with one plain sentence, shown in the panel that received the input;
nothing here decodes pixels of an image that is refused, so an oversized or malicious upload
costs a header read, not memory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from merging.errors import LabError

MAX_IMAGE_SIDE = 4096  # pixels, either side
MAX_IMAGE_BYTES = 20 * 2**20  # 20 MB per image file
MAX_IMAGES = 32  # images per request (attention-decay panel)
MAX_QUESTION_CHARS = 20_000  # a question longer than this is cut in the UI before it is tokenized
UPLOAD_LIMIT = "64mb"  # gradio's own cap on any upload (launch(max_file_size=...))


def limit_pil() -> None:
    """Make PIL refuse decompression bombs: more than 2x this many pixels raises DecompressionBombError."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE


def _name(path: str | Path) -> str:
    return Path(path).name or str(path)


def uploaded(path: str | Path, roots: list[Path]) -> str:
    """path when it (links resolved) lies inside one of roots; LabError before anything reads it otherwise."""
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(os.path.realpath(r)) for r in roots):
        return str(path)
    # the name only: saying where the file is (or whether it exists) would help someone probing the server
    raise LabError(f"file refused: {_name(path)} was not uploaded to this app; attach it with the upload button")


def check_image(path: str | Path) -> str:
    """The path when it is an image the app can use; LabError with the reason otherwise."""
    limit_pil()
    name = _name(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise LabError(f"image refused: {name} could not be read") from None
    if size > MAX_IMAGE_BYTES:
        raise LabError(f"image refused: {name} is {size / 2**20:.1f} MB; the limit is "
                       f"{MAX_IMAGE_BYTES // 2**20} MB per image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                w, h = img.size
                fmt = img.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LabError(f"image refused: {name} would decode to too many pixels (a decompression bomb?); "
                       f"the limit is {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise LabError(f"image refused: {name} is not an image (PNG, JPEG, WebP, GIF, ...)") from None
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE:
        raise LabError(f"image refused: {name} is {w}×{h} px; the limit is {MAX_IMAGE_SIDE} px a side")
    if w < 1 or h < 1:
        raise LabError(f"image refused: {name} has no pixels ({w}×{h})")
    return str(fmt)


def open_image(path: str | Path):
    """Checked, decoded, RGB PIL image (worker side); LabError when refused or undecodable."""
    check_image(path)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise LabError(f"image refused: {_name(path)} could not be decoded ({type(e).__name__})") from None


def check_images(paths: list[str], roots: list[Path] | None = None) -> list[str]:
    """paths when each is a usable image (and, given roots, lies inside one of them); LabError otherwise."""
    if len(paths) > MAX_IMAGES:
        raise LabError(f"too many images: {len(paths)}; give at most {MAX_IMAGES}")
    for p in paths:
        check_image(p if roots is None else uploaded(p, roots))
    return paths


def cap_question(text: str) -> tuple[str, str | None]:
    """(text, notice): text cut to MAX_QUESTION_CHARS characters, with a notice when it was cut."""
    if len(text) <= MAX_QUESTION_CHARS:
        return text, None
    return text[:MAX_QUESTION_CHARS], (f"the question was {len(text):,} characters long; only the first "
                                       f"{MAX_QUESTION_CHARS:,} were used")


MAX_URL = 16_384  # characters of a request's path and query: a link's state is at most 40 keys x 300 characters


class RefuseLongURLs:
    """ASGI middleware: a request whose path and query are longer than MAX_URL gets 414 and one line,
    before Gradio's page route (which fails with a 500 and a traceback in the log past 64 K)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            n = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            if n > MAX_URL:
                body = f"the link is {n:,} characters; the lab reads links of at most {MAX_URL:,}\n".encode()
                await send({"type": "http.response.start", "status": 414,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
