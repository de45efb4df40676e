"""Lazy, per-tensor access to a model folder's weights (single-file or sharded safetensors).

Headers are parsed once on open (cheap: a few KB per file) so names, shapes and dtypes are
known without reading any weights; tensors are read one at a time (or a block of rows at a
time) with plain file reads into a fresh tensor. Not mmap: mapped input pages would count in the
merging process's resident memory for as long as the file stays open.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from merging import file_digest, hub
from merging.errors import LabError

# safetensors header code -> torch dtype (the dtype names a recipe may give: merging.recipe.DTYPES).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_JSON = 64 * 1024 * 1024  # config.json, the index: a few MB at most on the hub
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def model_roots(folder: Path) -> tuple[Path, ...]:
    """Where a model folder's files may really be (links resolved): the folder itself and, for a
    Hugging Face cache snapshot (models--X/snapshots/<commit>), that repo's blobs/ folder, which is
    where the snapshot's links point. blobs/ is not itself resolved: a linked-away blobs/ is refused."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real, real.parent.parent / "blobs"
    return (real,)


def confine(folder: Path, f: Path) -> Path:
    """The real path of f, a file of the model folder; a one-line LabError naming f when it leads
    outside the folder (a symlink, a crafted index) or is not a regular file (a FIFO would hang the
    read, /dev/zero never ends). Only f's name is told, never where it leads or what it holds."""
    real = Path(os.path.realpath(f))
    if not any(real.is_relative_to(r) for r in model_roots(folder)):
        raise LabError(f"{f} leads outside the model folder {folder}; refused")
    try:
        st = os.stat(real)
    except OSError as e:
        raise LabError(f"{f}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LabError(f"{f} is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, "
                       "not a regular file; refused")
    return real


def open_regular(path: Path, shown: Path | None = None):
    """Open a file for reading that must be regular, without ever blocking. O_NONBLOCK makes opening a
    FIFO return at once, and the check is on the opened file (fstat), so a name swapped for a FIFO
    after an earlier check is still caught. Messages name `shown` (default: path)."""
    shown = shown or path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise LabError(f"{shown}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LabError(f"{shown} is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, "
                       "not a regular file; refused")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_header(path: Path, real: Path | None = None) -> tuple[dict, int]:
    """The safetensors header of one file and the byte offset where its data starts.
    real: where path really is (confine()), opened instead of path; messages name path."""
    with open_regular(real or path, path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise LabError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):  # n is the file's first 8 bytes: never shown
            raise LabError(f"{path} is corrupt or truncated: its header length exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
            raise LabError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise LabError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data_len = size - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = _check_entry(path, name, info, data_len)
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise LabError(f"{path} is corrupt: tensors {a!r} and {b!r} share bytes (overlapping data_offsets)")
    return header, 8 + n


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: Path, name: str, info, data_len: int) -> tuple[int, int]:
    """(begin, end) of one header entry, every value checked: a bad one is a one-line LabError."""
    bad = f"{path} is corrupt: tensor {name[:100]!r} has a bad header entry"
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in SAFETENSORS_DTYPES:
        raise LabError(f"{bad} (dtype)")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise LabError(f"{bad} (shape must be a list of whole numbers >= 0)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        raise LabError(f"{bad} (data_offsets must be [begin, end], whole numbers >= 0)")
    begin, end = offsets
    if end > data_len:
        raise LabError(f"{path} is truncated: tensor {name[:100]!r} extends past the end of the file")
    if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize:
        raise LabError(f"{path} is corrupt: tensor {name[:100]!r} has a byte range that does not match its shape")
    return begin, end


def _read_json(folder: Path, path: Path, what: str):
    """A JSON file of the model folder: confined, regular, bounded; messages never quote it."""
    try:
        with open_regular(confine(folder, path), path) as f:
            raw = f.read(_MAX_JSON + 1)  # bounded: a file that grows while read stops here too
        if len(raw) > _MAX_JSON:
            raise LabError(f"{path} is larger than {_MAX_JSON // 2**20} MB; not a model's JSON{what}")
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LabError(f"{path} is not valid JSON{what}") from None
    except OSError as e:
        raise LabError(f"{path}: {e.strerror or e}") from None


class Checkpoint:
    """One model folder. Use Checkpoint.open(ref) and close() (or a with-block)."""

    def __init__(self, path: Path, config: dict, files: dict[str, Path], meta: dict[str, dict],
                 headers: dict[Path, int], bin_files: bool = False):
        self.path = path
        self.config = config
        self._files = files  # tensor name -> file
        self._meta = meta  # tensor name -> {"dtype", "shape"}
        self._data_starts = headers  # file -> data offset
        self._bin = bin_files
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, ref: str | Path, allow_bin: bool = False) -> Checkpoint:
        path = hub.resolve(ref)
        cfg_path = path / "config.json"
        if not os.path.lexists(cfg_path):
            raise LabError(f"{path} has no config.json; is it a Hugging Face model folder?")
        config = _read_json(path, cfg_path, "")
        if not isinstance(config, dict):
            raise LabError(f"{cfg_path} is not a JSON object of model settings")
        index = path / "model.safetensors.index.json"
        file_of = _read_index(path, index) if os.path.lexists(index) else None
        if file_of is not None:
            shard_files = sorted({path / f for f in file_of.values()})
            for f in shard_files:
                if not os.path.lexists(f):
                    raise LabError(f"{index} names a missing shard: {f.name}")
        elif os.path.lexists(path / "model.safetensors"):
            shard_files = [path / "model.safetensors"]
        else:
            shard_files = sorted(path.glob("*.safetensors"))
            if not shard_files:
                return cls._open_bin(path, config, allow_bin)
        files, meta, starts = {}, {}, {}
        for f in shard_files:
            header, start = read_header(f, confine(path, f))
            starts[f] = start
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if file_of is not None and file_of.get(name) != f.name:
                    continue  # the index decides which shard owns a tensor
                if name in files:
                    raise LabError(f"tensor {name[:100]!r} appears in both {files[name].name} and {f.name}")
                files[name] = f
                meta[name] = {"dtype": info["dtype"], "shape": tuple(info["shape"]),
                              "offset": start + info["data_offsets"][0]}
        if file_of is not None:
            missing = [n for n in file_of if n not in files]
            if missing:
                raise LabError(f"{index} lists tensor {missing[0][:100]!r} but shard {file_of[missing[0]]} "
                               "does not hold it")
        return cls(path, config, files, meta, starts)

    @classmethod
    def _open_bin(cls, path: Path, config: dict, allow_bin: bool) -> Checkpoint:
        bins = sorted(path.glob("*.bin"))
        if not bins:
            raise LabError(f"{path} has no *.safetensors weights")
        if not allow_bin:
            raise LabError(
                f"{path} holds PyTorch .bin (pickle) weights, which can run code when loaded; "
                "convert them to safetensors or allow .bin explicitly (then they load with weights_only=True)"
            )
        files, meta = {}, {}
        for f in bins:
            sd = torch.load(confine(path, f), map_location="cpu", weights_only=True, mmap=True)
            for name, t in sd.items():
                files[name] = f
                meta[name] = {"dtype": _dtype_code(t.dtype), "shape": tuple(t.shape)}
        return cls(path, config, files, meta, {}, bin_files=True)

    def _open_file(self, f: Path):
        """A weights file, confined to the model folder and regular, checked again at each open."""
        return open_regular(confine(self.path, f), f)

    # -- queries ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._check(name)]["shape"]

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._meta[self._check(name)]["dtype"]]

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        f = self._files[self._check(name)]
        if self._bin:
            sd = self._handles.get(f)
            if sd is None:
                sd = self._handles[f] = torch.load(confine(self.path, f), map_location="cpu", weights_only=True,
                                                   mmap=True)
            return sd[name].to(device)
        m = self._meta[name]
        t = self._read(f, m["offset"], m["shape"], SAFETENSORS_DTYPES[m["dtype"]])
        return t if str(device) == "cpu" else t.to(device)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 (first dimension) of a tensor, reading only their bytes."""
        shape = self.shape(name)
        if self._bin:
            return self.get(name)[start:stop]
        m, dtype = self._meta[name], self.dtype(name)
        row = math.prod(shape[1:]) * dtype.itemsize
        return self._read(self._files[name], m["offset"] + start * row, (stop - start, *shape[1:]), dtype)

    def _read(self, f: Path, offset: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if t.numel() == 0:
            return t
        with self._lock:  # threads may read one checkpoint at once (the in-place merger's blocks)
            fh = self._handles.get(f)
            if fh is None:
                fh = self._handles[f] = self._open_file(f)  # closed in close()
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        got = 0
        while got < len(view):  # short reads happen (large reads, NFS)
            n = self._read_at(fh, view[got:], offset + got)
            if not n:
                raise LabError(f"{f} is truncated: could not read tensor bytes at offset {offset + got}")
            got += n
        return t

    def _read_at(self, fh, view: memoryview, offset: int) -> int:
        """Bytes read into view from offset: pread where the OS has it (no shared file position, so
        threads need no lock), else seek + read under the lock."""
        if hasattr(os, "preadv"):
            return os.preadv(fh.fileno(), [view], offset)
        with self._lock:
            fh.seek(offset)
            return fh.readinto(view) or 0

    def _check(self, name: str) -> str:
        if name not in self._files:
            raise LabError(f"tensor {name!r} not found in {self.path}")
        return name

    @property
    def fingerprint(self) -> str:
        """Identity for caches: config, every tensor's name/dtype/shape, and the full content hash
        of every file (merging.file_digest: hashed once per version of a file, then remembered by
        its stat identity), so it changes whenever any byte of any tensor does."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=12)
            h.update(json.dumps(self.config, sort_keys=True).encode())
            for name in self.names():
                m = self._meta[name]
                h.update(f"{name}|{m['dtype']}|{m['shape']}\n".encode())
            files = self.files()
            # hashlib lets go of the GIL on large blocks: the shards of a big checkpoint hash in parallel
            with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
                digests = list(pool.map(self._digest, files))
            for f, d in zip(files, digests):
                h.update(f"{f.name}:{d}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _digest(self, f: Path) -> str:
        with self._open_file(f) as fh:
            return file_digest.digest(confine(self.path, f), fh)

    def close(self) -> None:
        for h in self._handles.values():
            if hasattr(h, "close"):
                h.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._files)} tensors)"


def _read_index(folder: Path, index: Path) -> dict[str, str]:
    data = _read_json(folder, index, " (a safetensors index)")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict):
        raise LabError(f"{index} is not a valid safetensors index (no weight_map)")
    for name, f in wm.items():
        # a shard is a plain file name in the model folder, never a path out of it
        if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
            raise LabError(f"{index} is not a valid safetensors index: tensor {name[:100]!r} names "
                           f"a shard that is not a file name in the folder")
    return wm


def _dtype_code(dtype: torch.dtype) -> str:
    for code, dt in SAFETENSORS_DTYPES.items():
        if dt == dtype:
            return code
    raise LabError(f"unsupported tensor dtype {dtype}")
