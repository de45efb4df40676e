"""The one error type users see: a single line naming the thing at fault."""

import unicodedata


def printable(text: str) -> str:
    """text on one line with every other control character written as an escape: a name read from a
    hostile file (a NUL in a shard name) must not reach a terminal or a page as a raw byte."""
    return "".join(c if unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in " ".join(text.split()))


class LabError(Exception):
    """Bad input or an impossible request. The CLI prints it on one line and exits 2."""

    def __init__(self, message: str):
        # Keep it to one line: the CLI and the app show it verbatim.
        super().__init__(printable(str(message)))


class Cancelled(LabError):
    """The user (or the app's Cancel) stopped the job: not a fault, so callers report it apart."""

    def __init__(self, message: str = "cancelled"):
        super().__init__(message)


class WriteError(LabError):
    """The output could not be written (disk full, file too large, permissions)."""


def write_error(path, e: OSError) -> WriteError:
    """The one-line error for an OSError while writing PATH."""
    return WriteError(f"could not write {path}: {e.strerror or e}")
