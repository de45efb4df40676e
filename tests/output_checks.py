"""What the output-safety and interrupt tests share: the CLI run as a subprocess, the one-line
error check, a folder's snapshot, and the temp/old siblings an output may leave beside it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def cli(*args, cwd=ROOT, module="merging", timeout=300):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


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
