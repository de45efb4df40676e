"""The output folder of every command: the one check before writing (guard_output) and the
folder that appears whole or not at all (AtomicFolder).

A command writes into a hidden temp sibling, .OUT.tmp-XXXX, and renames it to OUT at the end; an
--overwrite sets the old OUT aside first and deletes it last. Signals are deferred across the
renames (merging.interrupts), so an interrupt leaves the old version or the new one, never a mix.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import stat
from pathlib import Path

from merging import hub, interrupts, lab_cache
from merging.errors import LabError, WriteError, write_error

MARKER = ".merge-lab"  # every folder the lab writes holds this file: {"kind": "model" | "report"}
_NAME_MAX = 255
_committed: set[str] = set()  # outputs this process has put in place (for the interrupt message)


# Never an output, empty or not, --overwrite or not: the system's folders, the home folder and the
# caches the lab and Hugging Face keep (replacing one loses what nobody asked to lose).
_SYSTEM = ("/bin", "/boot", "/dev", "/dev/shm", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt",
           "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib",
           "/usr/local", "/var", "/var/tmp")


def output_path(out_dir: str | Path) -> Path:
    """OUT_DIR as the lab writes it: `~` expanded and made absolute, here and nowhere else."""
    return Path(str(out_dir)).expanduser().absolute()


def committed(out_dir: str | Path) -> bool:
    """Whether this process has already put OUT_DIR in place (complete)."""
    return str(output_path(out_dir)) in _committed


def _protected() -> set[Path]:
    home = Path.home()
    caches = [home / ".cache", home / ".cache" / "merge-lab", lab_cache.root(), home / ".cache" / "huggingface",
              Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface")).expanduser()]
    return {_real(Path(p)) for p in (*_SYSTEM, home, *caches)}


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
    a system, home or cache folder, an input or a folder holding one, a folder inside a model
    input, a symbolic link, a file, a name too long for the temp sibling, a non-empty folder the
    lab did not write (no marker file: never replaced, even with --overwrite), and one it did
    write unless --overwrite or it is of the same `kind` (a report replaces its own previous one)."""
    if not str(out_dir).strip():
        raise LabError("the output folder name is empty; name a new folder")
    out = output_path(out_dir)
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
    if real in _protected():
        raise LabError(f"output {out} is a system, home or cache folder; name a new folder inside one")
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
    own = _kind_of(out)
    if empty or (overwrite and own is not None) or (kind is not None and own == kind):
        return out
    if own is None:
        raise LabError(f"output folder {out} exists, is not empty and was not written by the lab (no {MARKER} "
                       "file in it); the lab replaces only its own earlier outputs: choose another folder")
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
        self.out = output_path(out_dir)
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
            interrupts.track(self.tmp)  # before it exists: no instant where it exists unlisted
            self.tmp.mkdir()
            (self.tmp / MARKER).write_text(json.dumps({"kind": self.kind}) + "\n")
            return self.tmp  # inside the try: an interrupt at the return is caught too
        except BaseException as e:  # an interrupt here too: __exit__ will not run, so clean up now
            with interrupts.deferred_signals():
                self._discard()
            if isinstance(e, OSError):
                raise write_error(self.out, e) from None
            raise

    def _discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        interrupts.untrack(self.tmp)

    def __exit__(self, exc_type, exc, tb) -> bool:
        with interrupts.deferred_signals():
            if exc_type is not None:
                self._discard()
                return False
            if interrupts.NOTED:  # an interrupt whose exception was swallowed on the way: never commit after it
                self._discard()
                raise KeyboardInterrupt
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
        interrupts.untrack(self.tmp)
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


class AtomicFile:
    """`with AtomicFile(out, marker, inputs) as tmp:` writes one file at .OUT.tmp-XXXX beside OUT and
    renames it to OUT on success (signals deferred across the rename); on any exception it is removed.
    An existing OUT is replaced only when it is an earlier output of the same kind (`marker` within its
    first 4 KB); never a folder, a link, an input or anything else, --overwrite or not."""

    def __init__(self, out: str | Path, marker: str, inputs=()):
        self.out, self.marker, self.inputs = output_path(out), marker, tuple(inputs)
        self.tmp: Path | None = None

    def check(self) -> Path:
        out = self.out
        if not out.name.strip() or len(out.name.encode()) + 14 > _NAME_MAX:
            raise LabError(f"output file name {str(out)[:80]!r} is empty or too long; name a new file")
        for ref in self.inputs:
            src = _input_folder(ref) if ref else None
            if src is not None and (_real(out) == src or src in _real(out).parents):
                raise LabError(f"output {out} is (or is inside) the input {ref}; the lab never writes into an input")
        if not os.path.lexists(out):
            return out
        if out.is_symlink() or not out.is_file():
            raise LabError(f"output {out} exists and is not a plain file; name a new file")
        try:
            with open(out, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
        except OSError as e:
            raise LabError(f"output {out}: {e.strerror}") from None
        if self.marker not in head:
            raise LabError(f"output {out} exists and was not written by the lab; the lab replaces only its own "
                           "earlier outputs: choose another name")
        return out

    def __enter__(self) -> Path:
        self.check()
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{secrets.token_hex(4)}"
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.out, e) from None
        interrupts.track(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        with interrupts.deferred_signals():
            if exc_type is None and interrupts.NOTED:
                exc_type = KeyboardInterrupt
            if exc_type is None:
                try:
                    os.replace(self.tmp, self.out)
                    _committed.add(str(self.out))
                except OSError as e:
                    self.tmp.unlink(missing_ok=True)
                    interrupts.untrack(self.tmp)
                    raise write_error(self.out, e) from None
            else:
                self.tmp.unlink(missing_ok=True)
            interrupts.untrack(self.tmp)
        if exc_type is KeyboardInterrupt and exc is None:
            raise KeyboardInterrupt
        return False
