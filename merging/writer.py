"""Output side of a merge: an atomic folder, a sharded safetensors writer, the side files.

The writer knows every tensor's name, shape and dtype up front (the merge never changes them),
so it writes each shard's header first and then each tensor's bytes straight to its offset.
Nothing is buffered: peak memory is the tensor being written, whatever the shard size.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import threading
from pathlib import Path

import torch

from merging import hub
from merging.checkpoint import SAFETENSORS_DTYPES, confine, open_regular
from merging.errors import LabError

_CODES = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}
# Files of a model folder that are weights (never copied: the merge writes its own).
_WEIGHTS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|\.index\.json$", re.I)
_OWN = {"README.md", "recipe.yaml"}  # written by the engine


class WriteError(LabError):
    """The output could not be written (disk full, file too large, permissions)."""


def _oserror(path, e: OSError) -> WriteError:
    return WriteError(f"could not write {path}: {e.strerror or e}")


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


MARKER = ".merge-lab"  # every folder the lab writes holds this file: {"kind": "model" | "report"}
_NAME_MAX = 255
_committed: set[str] = set()  # outputs this process has put in place (for the interrupt message)
# Temp folders created and not yet put in place or removed. A signal can land where no
# `except`/`finally` of AtomicFolder sees it (the first instruction of __exit__, say); whoever
# catches the interrupt (merging.cli.run, or interpreter exit) removes these.
# No lock: set.add and set.discard are atomic, and a lock held when a signal lands may never be released.
_unfinished: set[Path] = set()


def committed(out_dir: str | Path) -> bool:
    """Whether this process has already put OUT_DIR in place (complete)."""
    return str(Path(str(out_dir)).expanduser().absolute()) in _committed


def discard_unfinished() -> None:
    """Remove every temp folder of this process that was neither put in place nor removed."""
    for tmp in list(_unfinished):
        shutil.rmtree(tmp, ignore_errors=True)
        _unfinished.discard(tmp)


atexit.register(discard_unfinished)  # an interrupt that ends the interpreter leaves nothing either


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _input_folder(ref) -> Path | None:
    """Where an input (model folder, recipe, image, hub id in the cache) really is, if anywhere."""
    p = Path(str(ref)).expanduser()
    try:
        if p.exists():
            return _real(p)
        return _real(hub.resolve(str(ref)))
    except (LabError, OSError):
        return None


def guard_output(out_dir, inputs=(), overwrite: bool = False, kind: str | None = None) -> Path:
    """The one check before any command writes OUT_DIR; returns its absolute path.
    Refused, with one line naming the path: "", /, the working directory or a folder above it,
    an input or a folder holding one, a folder inside a model input, a symbolic link, a file, a
    name too long for the temp sibling, and a non-empty folder, unless --overwrite or it is a
    lab-written folder of the same `kind` (a report replaces its own previous report)."""
    if not str(out_dir).strip():
        raise LabError("the output folder name is empty; name a new folder")
    out = Path(str(out_dir)).expanduser().absolute()
    if len(out.name.encode()) + 14 > _NAME_MAX:  # 14: ".", ".tmp-" and 8 hex digits of the temp sibling
        raise LabError(f"output folder name is too long ({len(out.name.encode())} bytes; at most "
                       f"{_NAME_MAX - 14}): {str(out)[:80]}...")
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise LabError(f"output {out}: {e.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        what = "a symbolic link to a missing target" if not out.exists() else "a symbolic link"
        raise LabError(f"output {out} is {what}; name a real folder")
    real, cwd = _real(out), _real(Path.cwd())
    if real == Path(real.anchor) or real == cwd or real in cwd.parents:
        raise LabError(f"output {out} is the working directory, one of its parents or /; name a new folder")
    for ref in inputs:
        src = _input_folder(ref) if ref else None
        if src is None:
            continue
        if real == src or real in src.parents:
            raise LabError(f"output {out} is (or holds) the input {ref}; the lab never replaces an input")
        if src.is_dir() and src in real.parents:
            raise LabError(f"output {out} is inside the input {ref}; the lab never writes into an input")
    if st is None:
        _refuse_stale(out)
        return out
    if not stat.S_ISDIR(st.st_mode):
        raise LabError(f"output {out} exists and is not a folder")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise LabError(f"output {out}: {e.strerror}") from None
    if empty or overwrite or (kind is not None and _kind_of(out) == kind):
        return out
    raise LabError(f"output folder {out} exists and is not empty; choose another or pass --overwrite to replace it")


def _kind_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _refuse_stale(out: Path) -> None:
    """A folder set aside by an --overwrite that was killed (SIGKILL, power) before it finished."""
    try:
        old = sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*"))
    except OSError:
        return
    if old:
        raise LabError(f"a previous --overwrite of {out} was cut off; the old output is in {old[0]}: "
                       "move it back to its name or remove it")


class deferred_signals:  # noqa: N801 (used like a function: `with deferred_signals():`)
    """SIGINT and SIGTERM wait until the block ends, then take effect: the renames that put an
    output in place (and the clean-ups) happen completely or not at all. Handlers can only be
    swapped in the main thread; elsewhere signals do not reach this code anyway.

    A signal that lands while the handlers are being swapped in raises before the block starts,
    with every handler put back; one that lands while they are being put back still lets all of
    them be put back before it acts."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> None:
        self.got: list[int] = []
        self.previous: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            for s in self._SIGNALS:
                self.previous[s] = signal.signal(s, self._hold)
        except BaseException:
            self._put_back()
            raise

    def _hold(self, signum, frame) -> None:
        self.got.append(signum)

    def _put_back(self) -> None:
        first = None
        for s, h in self.previous.items():
            while True:  # signal.signal runs pending handlers first; if one raises, s is not yet put back
                try:
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
                    break
                except BaseException as e:  # a signal acting through a handler already put back
                    first = first or e
        self.previous = {}
        if first is not None:
            raise first

    def __exit__(self, *exc) -> bool:
        self._put_back()
        if self.got:
            signal.raise_signal(self.got[0])
        return False


class AtomicFolder:
    """`with AtomicFolder(out, inputs=...) as tmp:` writes into .OUT.tmp-XXXX beside OUT and puts
    it in place as OUT on success; on any exception (KeyboardInterrupt included) the temp folder
    is removed and OUT is left as it was. OUT is checked first by guard_output. With overwrite,
    an old OUT is renamed aside, the new one renamed in, then the old one deleted; signals are
    deferred across the renames, and a failed second rename puts the old one back."""

    def __init__(self, out_dir: str | Path, overwrite: bool = False, inputs=(), kind: str = "model",
                 replace_own: bool = False):
        self.given = out_dir
        self.overwrite, self.inputs, self.kind, self.replace_own = overwrite, tuple(inputs), kind, replace_own
        self.out = Path(str(out_dir)).expanduser().absolute()
        self.tmp: Path | None = None

    def check(self) -> Path:
        """guard_output for this folder; raises LabError when OUT_DIR may not be written."""
        self.out = guard_output(self.given, self.inputs, self.overwrite, self.kind if self.replace_own else None)
        return self.out

    def __enter__(self) -> Path:
        self.check()
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{secrets.token_hex(4)}"
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _unfinished.add(self.tmp)  # before it exists: no instant where it exists unlisted
            self.tmp.mkdir()
            (self.tmp / MARKER).write_text(json.dumps({"kind": self.kind}) + "\n")
            return self.tmp  # inside the try: an interrupt at the return is caught too
        except BaseException as e:  # an interrupt here too: __exit__ will not run, so clean up now
            with deferred_signals():
                self._discard()
            if isinstance(e, OSError):
                raise _oserror(self.out, e) from None
            raise

    def _discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        _unfinished.discard(self.tmp)

    def __exit__(self, exc_type, exc, tb) -> bool:
        with deferred_signals():
            if exc_type is not None:
                self._discard()
                return False
            self._commit()
        return False

    def _commit(self) -> None:
        out, old = self.out, None
        replace = self.overwrite or (self.replace_own and _kind_of(out) == self.kind)
        try:
            if replace and out.is_dir() and any(out.iterdir()):
                old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
                out.rename(old)
            os.rename(self.tmp, out)  # an empty OUT is replaced; a non-empty one fails: never clobbered
        except OSError as e:
            self._discard()
            raise self._restore(old, e) from None
        _committed.add(str(out))
        _unfinished.discard(self.tmp)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _restore(self, old: Path | None, e: OSError) -> WriteError:
        """Put the set-aside old output back after a failed rename; say exactly where it is."""
        if old is None:
            return WriteError(f"could not put the output in place at {self.out}: {e.strerror or e}")
        try:
            os.rename(old, self.out)
        except OSError:
            return WriteError(f"could not replace {self.out}: {e.strerror or e}; the previous output is in {old}")
        return WriteError(f"could not replace {self.out}: {e.strerror or e}; the previous output is unchanged")


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
                raise _oserror(path, e) from None
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
            raise _oserror(self.folder / self.files[i], e) from None
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
                    raise _oserror(f.name, e) from None

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
                raise _oserror(dst / name, e) from None
    return [name for name, _ in files]


def write_text(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise _oserror(path, e) from None
