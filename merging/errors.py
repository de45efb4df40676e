"""The one error type users see: a single line naming the thing at fault."""


class LabError(Exception):
    """Bad input or an impossible request. The CLI prints it on one line and exits 2."""

    def __init__(self, message: str):
        # Keep it to one line: the CLI and the app show it verbatim.
        super().__init__(" ".join(str(message).split()))


class Cancelled(LabError):
    """The user (or the app's Cancel) stopped the job: not a fault, so callers report it apart."""

    def __init__(self, message: str = "cancelled"):
        super().__init__(message)


class WriteError(LabError):
    """The output could not be written (disk full, file too large, permissions)."""


def write_error(path, e: OSError) -> WriteError:
    """The one-line error for an OSError while writing PATH."""
    return WriteError(f"could not write {path}: {e.strerror or e}")
