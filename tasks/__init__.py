"""The toy tasks behind the bundled family: scenes and their rendering, question templates, the
held-out split, DRIFT's fine-tune examples. A leaf package: it imports nothing of the lab's, so
merging, analysis and tools may all use it."""
