"""What the output-safety and interrupt tests share: the CLI run in this process (or, where exit
codes of a real process or signals are the point, as a subprocess), the one-line error check, a
folder's snapshot, and the temp/old siblings an output may leave beside it."""

import importlib
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from tests.paths import ENV, ROOT


@dataclass
class Finished:
    """What subprocess.run returns, for a CLI run in this process."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args, cwd=ROOT, module="merging", timeout=300, real=False):
    """`python -m MODULE ARGS` in `cwd`: through the module's main() in this process (a subprocess
    costs 3-5 s of imports per call), or as a real subprocess when `real`."""
    if real:
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=ENV,
                              capture_output=True, text=True, timeout=timeout)
    main = importlib.import_module(f"{module}.__main__").main
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return Finished(code, out.getvalue(), err.getvalue())


def one_line(r, code: int, *parts: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def snapshot(folder) -> list:
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*"))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith("." + out.name))
