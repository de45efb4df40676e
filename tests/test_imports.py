"""Imports live at the top of each module. A function-local import stays only with its reason on
its line or the line above: `# lazy: ...` (a measured start-up cost, or an optional dependency)
or `# cycle: ...` (the import cycle it avoids, naming the modules)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from tests.paths import ROOT

CHECKED = ("merging", "analysis", "webapp", "tasks")
REASONS = ("# lazy:", "# cycle:")


def sources() -> list[Path]:
    return sorted(p for pkg in CHECKED for p in (ROOT / pkg).rglob("*.py")) + [ROOT / "app.py"]


def _module_level(tree: ast.Module) -> set[int]:
    """ids of the import nodes at module level: the module body, and the bodies of its top-level
    `if` (TYPE_CHECKING) and try/except blocks."""
    out, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.add(id(node))
        elif isinstance(node, ast.If):
            todo += node.body + node.orelse
        elif isinstance(node, (ast.Try, ast.TryStar)):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def _reasons(text: str) -> set[int]:
    """Lines (1-based) an import on which is explained: those holding a comment that starts with
    a reason, and the line after each comment line (nothing but the comment) that does."""
    out = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(REASONS):
            row, col = tok.start
            out.add(row)
            if not tok.line[:col].strip():
                out.add(row + 1)
    return out


def unexplained_local_imports(path: Path, text: str | None = None) -> list[str]:
    """file:line of every import below module level without its reason."""
    text = path.read_text() if text is None else text
    tree = ast.parse(text, str(path))
    top, explained = _module_level(tree), _reasons(text)
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    lines = sorted(node.lineno for node in ast.walk(tree)
                   if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top)
    return [f"{name}:{n}" for n in lines if n not in explained]


def test_every_local_import_says_why():
    bad = [where for p in sources() for where in unexplained_local_imports(p)]
    assert not bad, "imports inside functions without a '# lazy:' or '# cycle:' reason " \
                    "(move them to the top of the module): " + ", ".join(bad)


def test_the_check_sees_an_unexplained_local_import():
    path = ROOT / "merging" / "example.py"
    text = ("import os\n"
            "if os.name:\n    import json\n"
            "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
            "def f():\n    import shutil\n"
            "    # lazy: measured 1 s\n    import torch\n"
            "    from tqdm import tqdm  # lazy: measured\n"
            "    # cycle: a imports b at top\n    from b import c\n"
            "    # a comment, not a reason\n    import signal\n"
            "    import glob  # lazy: measured\n    import re\n"
            "class A:\n    def g(self):\n        from pathlib import Path\n")
    assert unexplained_local_imports(path, text) == ["merging/example.py:9", "merging/example.py:16",
                                                     "merging/example.py:18", "merging/example.py:21"]


def test_the_check_reads_every_package_and_the_app():
    names = {str(p.relative_to(ROOT)) for p in sources()}
    assert {"app.py", "merging/engine.py", "merging/methods/ties.py", "analysis/analyses/knockout_spec.py",
            "webapp/worker/process.py", "tasks/toydata.py"} <= names
