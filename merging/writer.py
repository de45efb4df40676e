"""The files of a merged model: a sharded safetensors writer and the side files (config, tokenizer...).

The writer knows every tensor's name, shape and dtype up front (the merge never changes them),
so it writes each shard's header first and then each tensor's bytes straight to its offset.
Nothing is buffered: peak memory is the tensor being written, whatever the shard size.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from merging.checkpoint import SAFETENSORS_DTYPES, confine, open_regular
from merging.errors import LabError, write_error

_CODES = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}
# Files of a model folder that are weights (never copied: the merge writes its own).
_WEIGHTS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|\.index\.json$", re.I)
_OWN = {"README.md", "recipe.yaml"}  # written by the engine


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB', or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.I)
    if not m:
        raise LabError(f"shard size {text!r} is not a size like 500MB or 2GB")
    unit = 1024 if m.group(3) else 1000
    try:
        n = int(float(m.group(1)) * unit ** "_KMGT".index(m.group(2).upper() or "_"))
    except (ValueError, OverflowError):  # "1.2.3", or 400 digits: past the float range
        raise LabError(f"shard size {text[:40]!r} is not a size like 500MB or 2GB") from None
    if n <= 0:
        raise LabError(f"shard size {text!r} must be positive")
    return n


def plan_shards(entries: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int) -> list[list[tuple]]:
    """Greedy, in the given order: a new shard starts when the next tensor would overflow.
    A single tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        n = _nbytes(e[1], e[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Write a known set of tensors into safetensors shards (+ index when more than one)."""

    def __init__(self, folder: Path, entries: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int):
        self.folder = Path(folder)
        shards = plan_shards(entries, max_shard_bytes)
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[int, int, tuple, torch.dtype]] = {}  # name -> shard, offset, shape, dtype
        self._handles = []
        self.total = 0
        for i, shard in enumerate(shards):
            header, offset = {}, 0
            for name, shape, dtype in shard:
                nb = _nbytes(shape, dtype)
                header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
                offset += nb
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, like safetensors does
            start = 8 + len(raw)
            path = self.folder / self.files[i]
            try:
                f = open(path, "wb")  # noqa: SIM115 (closed in close_files())
                self._handles.append(f)
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(start + offset)  # full size now; tensors fill their own ranges
            except OSError as e:
                self.close_files()
                raise write_error(path, e) from None
            for name, shape, dtype in shard:
                self.where[name] = (i, start + header[name]["data_offsets"][0], tuple(shape), dtype)
            self.total += offset
        self.pending = set(self.where)
        self._written: dict[str, int] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_rows(name, 0, tensor, whole=True)

    def write_rows(self, name: str, start: int, tensor: torch.Tensor, whole: bool = False) -> None:
        """Rows start.. of a planned tensor (first dimension); the tensor counts as written once
        all its bytes are. whole: `tensor` is the entire tensor (any number of dimensions)."""
        i, offset, shape, dtype = self.where[name]
        want = shape if whole else (tensor.shape[0], *shape[1:]) if shape else None
        if want is None or tuple(tensor.shape) != tuple(want) or tensor.dtype != dtype or (
                not whole and start + tensor.shape[0] > shape[0]):
            raise RuntimeError(f"{name}: planned {shape} {dtype}, got rows {start}.. of {tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = t.numel() * t.element_size()
        f = self._handles[i]
        try:
            f.seek(offset + (start * nbytes // max(1, tensor.shape[0]) if not whole else 0))
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))
                f.flush()  # surface a full disk here, on this tensor, not later at close
        except OSError as e:
            raise write_error(self.folder / self.files[i], e) from None
        done = self._written.get(name, 0) + nbytes
        self._written[name] = done
        if done >= _nbytes(shape, dtype):
            self.pending.discard(name)

    def close_files(self, strict: bool = False) -> None:
        """Close the shard files; errors are raised when strict (success path), else ignored
        (cleanup after a failure that has already raised)."""
        handles, self._handles = self._handles, []
        for f in handles:
            try:
                f.close()
            except OSError as e:
                if strict:
                    raise write_error(f.name, e) from None

    def finish(self) -> None:
        """Check every planned tensor was written; write the index when there are shards."""
        self.close_files(strict=True)
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} tensors were never written, e.g. {sorted(self.pending)[0]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: self.files[w[0]] for name, w in sorted(self.where.items())}}
            write_text(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2))


# Side files are configs, tokenizers, templates: the largest on the hub are tokenizers of ~35 MB.
SIDE_FILE_MAX = 1 << 30
SIDE_TOTAL_MAX = 2 << 30


def side_files(src: Path) -> list[tuple[str, Path]]:
    """What a loader needs besides the weights (config, generation config, tokenizer, processor,
    chat template...): every top-level file that is not a weight file, as (name, real path).
    Subfolders are skipped (on the hub they hold things like original/ consolidated weights).
    Checked before a merge starts, each a one-line LabError naming the file: a link out of the
    model folder (it would be copied into the output, then served by the app's export), a FIFO or
    device (/dev/zero never ends), a file over SIDE_FILE_MAX, all of them over SIDE_TOTAL_MAX."""
    out, total = [], 0
    for f in sorted(Path(src).iterdir()):
        if f.is_dir() or f.name.startswith(".") or f.name in _OWN or _WEIGHTS.search(f.name):
            continue
        try:
            real = confine(Path(src), f)  # hub snapshots are links into the repo's blobs/: allowed
        except LabError as e:
            raise LabError(f"side file {e}") from None
        size = real.stat().st_size
        total += size
        if size > SIDE_FILE_MAX or total > SIDE_TOTAL_MAX:
            raise LabError(f"side file {f} is {size / 2**20:.0f} MB: past the {SIDE_FILE_MAX // 2**20} MB per file "
                           f"or {SIDE_TOTAL_MAX // 2**20} MB in all copied beside the weights; refused")
        out.append((f.name, real))
    return out


def copy_side_files(src: Path, dst: Path, files: list[tuple[str, Path]] | None = None) -> list[str]:
    """Copy side_files(src) (or the given list of them) into dst, each re-checked as it is opened
    and cut off at SIDE_FILE_MAX bytes whatever its size said (a file growing while copied)."""
    files = side_files(src) if files is None else files
    for name, real in files:
        with open_regular(real, Path(src) / name) as fin:
            try:
                with open(dst / name, "wb") as fout:
                    copied = 0
                    while block := fin.read(1 << 20):
                        copied += len(block)
                        if copied > SIDE_FILE_MAX:
                            raise LabError(f"side file {Path(src) / name} grew past {SIDE_FILE_MAX // 2**20} MB "
                                           "while it was copied; refused")
                        fout.write(block)
            except OSError as e:
                raise write_error(dst / name, e) from None
    return [name for name, _ in files]


def write_text(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise write_error(path, e) from None
