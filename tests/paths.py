"""Where the tests find the lab: its folder, the bundled toy family, and the environment a CLI
subprocess gets (never a hub; the lab importable from any working folder)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "assets" / "toy"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
