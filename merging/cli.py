"""What every command line of the lab shares: one-line errors, exit codes, interrupts.

Exit 0 on success, 2 with `error: <one line>` on stderr for bad input (LabError, or an OSError
such as a path too long or unreadable), 128 + the signal number (130 for SIGINT, 143 for SIGTERM)
when interrupted, with a line that says whether the output was already complete. SIGTERM, SIGHUP
and SIGQUIT are handled like SIGINT, so a killed command cleans up its temp folder too.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from merging.errors import LabError, printable
from merging.interrupts import CAUGHT, NOTED, discard_unfinished


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract of every command) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """Parsed arguments with OUT_DIR already as the lab writes it (`~` expanded, absolute), so
        every later use of it (the report, the interrupt message) names the same folder."""
        ns = super().parse_args(args, namespace)
        out = getattr(ns, "out_dir", None)
        if isinstance(out, str) and out.strip():
            # lazy: merging.output_folder brings huggingface_hub (0.12 s, -X importtime); `--help` needs neither.
            from merging.output_folder import output_path

            ns.out_dir = str(output_path(out))
        return ns


def count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def run(command: Callable[[], int], out_dir: str | None = None) -> int:
    """Run one command with the lab's exit-code contract (see the module docstring)."""
    interrupted = NOTED
    interrupted.clear()

    def on_signal(signum, frame):
        # Remember it: a signal that lands inside native code (torch, the safetensors reader)
        # can come back as another exception type, or be swallowed where Python ignores exceptions
        # (a finalizer); it is still an interrupt, and the commit of an output checks NOTED.
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in CAUGHT}
    try:
        code = command()
        return _interrupted(out_dir, interrupted) if interrupted else code
    except KeyboardInterrupt:
        return _interrupted(out_dir, interrupted)
    except Exception as e:
        if interrupted:
            return _interrupted(out_dir, interrupted)
        if isinstance(e, LabError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):  # a path the system refuses (too long, unreadable...): bad input
            where = f" ({e.filename})" if e.filename else ""
            print(f"error: {printable(f'{e.strerror or e}{where}')}"[:500], file=sys.stderr)
            return 2
        raise
    finally:
        if interrupted:  # a repeat still pending runs, and is dropped, under SIG_IGN: it would turn 130 into -2
            for s in previous:
                while True:
                    try:
                        signal.signal(s, signal.SIG_IGN)
                        break
                    except KeyboardInterrupt:
                        pass
        for s, h in previous.items():
            while True:  # signal.signal first runs a pending handler: a repeat of the interrupt being handled
                try:
                    signal.signal(s, h)
                    break
                except KeyboardInterrupt:
                    if not interrupted:
                        raise
        if interrupted:
            _forget_the_escaped_interrupt()


def _forget_the_escaped_interrupt() -> None:
    # CPython 3.11 remembers a KeyboardInterrupt that escaped code run by exec() of a string (the
    # dataclass and namedtuple factories do this while torch and transformers import) even though we
    # caught it, and `python -m` then ends by SIGINT (-2) whatever exit code it returns. An exec() of
    # a string that ends normally clears that flag.
    exec("")  # noqa: S102 (an empty, constant string)


def _interrupted(out_dir: str | None, signals: list[int]) -> int:
    # `--help` and a usage error import this module alone (0.07 s); merging.output_folder imports
    # lazy: huggingface_hub (0.12 s, -X importtime), and only an interrupt needs it.
    from merging.output_folder import committed

    discard_unfinished()  # a temp folder the interrupt caught where no clean-up of its own could run
    signum = signals[0] if signals else signal.SIGINT
    name = signal.Signals(signum).name
    if out_dir is None:
        state = "nothing was written"
    elif committed(out_dir):
        state = f"the output {out_dir} was already complete"
    elif Path(out_dir).exists():
        state = f"nothing was written; {out_dir} is as it was"
    else:
        state = "nothing was written"
    # Outputs appear atomically (merging.output_folder.AtomicFolder): complete, or as they were.
    print(f"error: interrupted ({name}); {state}", file=sys.stderr)
    return 128 + signum
