"""The code map in docs/ARCHITECTURE.md stays true, and the top layer (app.py) is imported by nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.paths import ROOT

PACKAGES = ("webapp", "analysis", "merging", "tasks", "tools")


def code_map() -> list[tuple[str, str]]:
    """(section folder, file name) of every .py the map's code block names."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("```\n", 2)[1]
    out, section = [], ""
    for line in block.splitlines():
        head = line.split("  ")[0]
        if not line.startswith(" ") and head.endswith("/"):
            section = head
        names = re.findall(r"[\w/]+\.py\b", head if not line.startswith(" ") else line.strip().split("  ")[0])
        out += [(section if line.startswith(" ") else "", n) for n in names]
    return out


def test_the_map_names_only_files_that_exist():
    missing = [f"{s}{n}" for s, n in code_map() if not (ROOT / s / n).is_file()]
    assert not missing, missing


def test_every_public_module_is_on_the_map():
    named = {str(Path(s) / n) for s, n in code_map()}
    public = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
              if p.name != "__init__.py" and "methods" not in p.parts}
    assert not public - named, sorted(public - named)


def test_no_package_imports_the_app_module():
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n == "app" or n.startswith("app.") for n in names), path


def test_no_function_over_60_lines_outside_tests():
    """nanoGPT-style readability: long functions are split into named steps."""
    long = []
    for path in [ROOT / "app.py", *[p for d in ("merging", "analysis", "webapp", "tasks", "tools")
                                    for p in (ROOT / d).rglob("*.py")]]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
