"""A disk cache for analysis results, keyed by (analysis name, checkpoint fingerprints, parameters).

Results are stored as JSON text, never pickles: the cache only ever holds plain data (dicts,
lists, floats). diskcache would unpickle a row stored in its pickle mode (or read a file the row
names) before we could look at it, so the cache runs on a Disk that stores every value as text in
the database and refuses any other row unread: a crafted database can cost a recompute, never
run code or open a path. Any problem with an entry (garbled text, wrong type, unreadable
database) deletes it and recomputes; the cache never makes an analysis fail.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import MODE_RAW, UNKNOWN

from merging import lab_cache

# Bump when the shape or the meaning of a cached result changes, so old entries are never misread.
# 2: live-model analyses are keyed on the weights they ran on; schema-1 entries of the attention
# and knockout baselines may hold results of a merge filed under the original VLM, so they are never read.
SCHEMA = 2


class JSONOnlyDisk(diskcache.Disk):
    """A diskcache.Disk that stores str values in the database and reads back nothing else."""

    def store(self, value, read, key=UNKNOWN):
        if type(value) is not str or read:
            raise TypeError(f"the analysis cache stores JSON text, not {type(value).__name__}")
        return 0, MODE_RAW, None, value  # in the row itself: no value files to point elsewhere

    def fetch(self, mode, filename, value, read):
        # Checked before anything is decoded: pickle rows, file rows and blobs are refused unread.
        if mode != MODE_RAW or filename is not None or type(value) is not str:
            raise ValueError(f"not a JSON text row (mode {mode})")
        return value

    def remove(self, file_path):
        # Only rows we did not write name files; delete one only if it is a regular file inside
        # the cache folder (a crafted row could name any path).
        folder = Path(self._directory).resolve()
        path = Path(self._directory, str(file_path))
        try:
            if path.resolve().parent.is_relative_to(folder) and path.is_file() and not path.is_symlink():
                path.unlink()
        except OSError:
            pass


def default_dir() -> Path:
    return lab_cache.root()


def make_key(name: str, key_parts: Any) -> str:
    """A stable text key: sha256 of the canonical JSON of (schema, name, key parts)."""
    text = json.dumps([SCHEMA, name, key_parts], sort_keys=True, default=str, separators=(",", ":"))
    return f"{name}:{hashlib.sha256(text.encode()).hexdigest()}"


class AnalysisCache:
    """Thin wrapper over diskcache.Cache that stores JSON text and heals corrupt entries."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory else default_dir()
        self._cache = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # size_limit: a few GB; results are small (spectra of a 7B model are a few MB).
            # disk_min_file_size: every value stays in its row (store() never writes value files).
            self._cache = diskcache.Cache(str(self.directory), size_limit=4 * 2**30, disk=JSONOnlyDisk,
                                          disk_min_file_size=2**40)
        except Exception as e:  # an unusable folder only costs speed
            warnings.warn(f"analysis cache disabled ({self.directory}): {e}", stacklevel=2)

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def get(self, key: str, expect: type = dict):
        """The stored value, or None when missing or corrupt (a corrupt entry is deleted)."""
        if self._cache is None:
            return None
        try:
            raw = self._cache.get(key, default=None)
            if raw is None:
                return None
            if not isinstance(raw, str):
                raise TypeError(f"stored {type(raw).__name__}, expected JSON text")
            value = json.loads(raw)
            if not isinstance(value, dict) or value.get("schema") != SCHEMA or not isinstance(value.get("data"), expect):
                raise TypeError("entry has the wrong shape")
            return value["data"]
        except Exception as e:  # refused rows, garbled text, wrong types, sqlite errors
            warnings.warn(f"dropping corrupt cache entry {key}: {type(e).__name__}: {e}", stacklevel=2)
            self.delete(key)
            return None

    def set(self, key: str, data) -> None:
        if self._cache is None:
            return
        # allow_nan: an SVD of an all-zero matrix can legitimately give a NaN ratio.
        text = json.dumps({"schema": SCHEMA, "data": data}, allow_nan=True)
        try:
            self._cache.set(key, text)
        except Exception as e:
            warnings.warn(f"could not write cache entry {key}: {e}", stacklevel=2)

    def delete(self, key: str) -> None:
        if self._cache is None:
            return
        try:
            self._cache.delete(key)
        except Exception:
            # The entry cannot even be deleted: start this folder over rather than fail.
            try:
                self._cache.clear()
            except Exception:
                self._cache = None

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()


_shared: dict[Path, AnalysisCache] = {}


def get_cache(directory: str | Path | None = None) -> AnalysisCache:
    """One AnalysisCache per folder per process (opening sqlite each time would cost ~ms)."""
    path = Path(directory).expanduser() if directory else default_dir()
    if path not in _shared or not _shared[path].enabled:
        _shared[path] = AnalysisCache(path)
    return _shared[path]


def cached(name: str, key_parts, compute_fn: Callable[[], Any], cache_dir: str | Path | None = None,
           expect: type = dict):
    """compute_fn() once per (name, key_parts); later calls return the stored plain data.

    key_parts: anything JSON-able that determines the result (fingerprints, parameters).
    The computed value must be JSON-able plain data of type `expect`.
    """
    cache = get_cache(cache_dir)
    key = make_key(name, key_parts)
    hit = cache.get(key, expect)
    if hit is not None:
        return hit
    value = compute_fn()
    if not isinstance(value, expect):
        raise TypeError(f"analysis {name!r} returned {type(value).__name__}, expected {expect.__name__}")
    # Round-trip through JSON so a first call returns exactly what a cached call would.
    value = json.loads(json.dumps(value, allow_nan=True))
    cache.set(key, value)
    return value
