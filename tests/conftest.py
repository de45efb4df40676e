"""Test-wide settings: nothing reaches out to a hub, and runs are reproducible."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Decompositions the tests compute stay out of the user's ~/.cache.
os.environ.setdefault("MERGE_LAB_CACHE", tempfile.mkdtemp(prefix="merge-lab-test-cache-"))
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The app's fixtures (one app per session, Chromium pages), for every test module that asks for them.
pytest_plugins = ("tests.app_fixtures", "tests.worker_harness")


@pytest.fixture(scope="session")
def smoke_family(tmp_path_factory):
    """The toy family's smoke build (tools/make_toy_family.py --smoke, its default two processes),
    made once per test session: (folder, what the tool printed)."""
    out = tmp_path_factory.mktemp("smoke") / "family"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_toy_family.py"), "--smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stdout


@pytest.fixture(scope="session")
def kits(tmp_path_factory):
    """family -> its {vlm, reasoner, base} folders (tests.family_kits), each built once per test session."""
    from tests.family_kits import build  # lazy: only the family tests pay for importing transformers

    root, built = tmp_path_factory.mktemp("families"), {}

    def get(family: str) -> dict:
        if family not in built:
            built[family] = build(family, root / family)
        return built[family]

    return get
