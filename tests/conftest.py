"""Test-wide settings: nothing reaches out to a hub, and runs are reproducible."""

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Decompositions the tests compute stay out of the user's ~/.cache.
os.environ.setdefault("MERGE_LAB_CACHE", tempfile.mkdtemp(prefix="merge-lab-test-cache-"))
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
