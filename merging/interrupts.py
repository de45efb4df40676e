"""What keeps an output whole when SIGINT or SIGTERM lands: signals deferred across the renames,
and the list of temp folders not yet put in place, which whoever catches the interrupt removes.

A signal can land at any Python instruction, including the first one of an `__exit__`, where no
`except` or `finally` of the writer sees it. So the clean-up has a second owner: the catcher of the
interrupt (merging.cli.run) or interpreter exit (atexit) calls discard_unfinished().
"""

from __future__ import annotations

import atexit
import shutil
import signal
import threading
from pathlib import Path

# The signals a command cleans up after: ^C, kill, a closed terminal (SIGHUP) and SIGQUIT, which
# by default would end the process with its temp folder (model-sized) left behind.
CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

# The signals the running command has received (merging.cli.run appends to it). Its KeyboardInterrupt
# can be lost where Python ignores exceptions (a finalizer running when the signal lands), so an
# output is put in place only while this is empty.
NOTED: list[int] = []

# No lock: set.add and set.discard are atomic, and a lock held when a signal lands may never be released.
_unfinished: set[Path] = set()


def track(tmp: Path) -> None:
    """TMP is about to be created: list it first, so there is no instant where it exists unlisted."""
    _unfinished.add(tmp)


def untrack(tmp: Path) -> None:
    """TMP was put in place or removed."""
    _unfinished.discard(tmp)


def discard_unfinished() -> None:
    """Remove every temp folder (or file) of this process that was neither put in place nor removed."""
    for tmp in list(_unfinished):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        _unfinished.discard(tmp)


atexit.register(discard_unfinished)  # an interrupt that ends the interpreter leaves nothing either


class deferred_signals:  # noqa: N801 (used like a function: `with deferred_signals():`)
    """SIGINT and SIGTERM wait until the block ends, then take effect: the renames that put an
    output in place (and the clean-ups) happen completely or not at all. Handlers can only be
    swapped in the main thread; elsewhere signals do not reach this code anyway.

    A signal that lands while the handlers are being swapped in raises before the block starts,
    with every handler put back; one that lands while they are being put back still lets all of
    them be put back before it acts."""

    _SIGNALS = CAUGHT

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
