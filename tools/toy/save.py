"""Atomic writing of a model folder: build it beside the target, then swap it in."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def save_atomic(out_dir: Path, write) -> Path:
    """Call write(tmp_dir) on a fresh folder next to out_dir, then replace out_dir with it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_model(out_dir: Path, model, tokenizer, processor=None, extra: dict[str, str] | None = None) -> Path:
    """A Hugging Face folder (model, tokenizer, processor) plus `extra` small text files."""

    def write(tmp: Path) -> None:
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text + "\n")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)

    return save_atomic(out_dir, write)
