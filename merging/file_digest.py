"""The full content hash of a weights file, computed once per version of the file and kept beside
the lab's caches, keyed by the file's stat identity (device, inode, size, mtime and ctime in ns).

Every cache the lab keeps (decompositions, analyses, merged states) is keyed on checkpoint
fingerprints, so a fingerprint must change whenever any byte of any tensor does: a sample of the
file is not enough (two fine-tunes of the same size that differ in one tensor looked the same).
Hashing a 15 GB checkpoint takes a while, once; any write to the file changes its ctime, so a
changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from merging import lab_cache

CHUNK = 1 << 22


def store_dir() -> Path:
    return lab_cache.root() / "file-digests"


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry(path: Path) -> Path:
    return store_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def digest(path: Path, fh) -> str:
    """blake2b of every byte of the open regular file `fh` (at `path`), from the store when the
    file is the version hashed before."""
    ident = _identity(os.fstat(fh.fileno()))
    entry = _entry(Path(os.path.realpath(path)))
    try:
        known = lab_cache.read_json(entry)
        if known.get("identity") == ident and isinstance(known.get("digest"), str):
            return known["digest"]
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.blake2b(digest_size=16)
    fh.seek(0)
    for block in iter(lambda: fh.read(CHUNK), b""):
        h.update(block)
    value = h.hexdigest()
    try:  # a store that cannot be written only costs a hash next time
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path), "identity": ident, "digest": value}))
        os.replace(tmp, entry)
    except OSError:
        pass
    return value
