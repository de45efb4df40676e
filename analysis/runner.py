"""The one way an analysis is run, by the CLI report and by the app's worker alike.

A Job names the triple, the recipe's merge (or None), where results are cached and a Source: how
the analysis gets a model holding the weights it asks for (the report loads folders from disk, the
worker hands over its loaded model). Cache keys name the weights (merging.merge_identity.weights_id of
the triple and the recipe), never the source, so the report and the app serve each other's results.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from analysis import analyses, figures, precomputed
from analysis.attention import SAMPLES_DIR
from analysis.cache import cached
from analysis.evaluate import EVAL_DIR
from merging import hub
from merging.engine import merge_to_disk
from merging.errors import LabError
from merging.inplace import merge_key, triple_fingerprints, weights_id
from merging.loading import load_model


@dataclass
class Job:
    triple: tuple[str, str, str | None]
    recipe: object | None  # merging.recipe.Recipe of the merge analysed, None: the VLM alone
    source: object  # DiskSource or the worker's source: model(job, merged, attentions), weights(job, merged)
    device: str = "cpu"
    cache_dir: str | Path | None = None
    progress: Callable | None = None
    samples_dir: Path = SAMPLES_DIR
    eval_dir: Path = EVAL_DIR
    precomputed: bool = False  # serve a shipped result (analysis.precomputed) whose key is the one asked
    served: list = field(default_factory=list)  # the shipped entries served (their meta says how made)
    _ids: dict = field(default_factory=dict)

    def weights_id(self, merged: bool) -> str:
        """What results on the VLM (merged False) or on the recipe's merge are cached under."""
        if merged not in self._ids:
            if merged:
                fps = triple_fingerprints(*self.triple)
                self._ids[merged] = weights_id(fps, merge_key(self.recipe))
            else:
                self._ids[merged] = weights_id(triple_fingerprints(self.triple[0], None), None)
        return self._ids[merged]

    def cached(self, name: str, key: dict, compute: Callable[[], dict]) -> dict:
        shipped = precomputed.find(name, key) if self.precomputed else None
        if shipped is not None:
            self.served.append(shipped)
            return shipped["data"]
        return cached(name, key, compute, self.cache_dir)


def run(name: str, job: Job, given: dict) -> tuple[dict, dict]:
    """(result, the knob values used); LabError when the analysis cannot run for this job."""
    a = analyses.get(name)
    reason = a.skip(job)
    if reason:
        raise LabError(reason)
    p = a.params(given)
    return a.run(job, p), p


def figures_of(name: str, data: dict) -> dict:
    """report file name -> plotly Figure of one analysis' result."""
    return {f.file: getattr(figures, f.builder)(data) for f in analyses.get(name).figures}


class DiskSource:
    """Models read from their folders; the recipe's merge is written to a temporary folder on
    first use (beside `parent`) and removed by close()."""

    def __init__(self, parent: Path):
        self.parent = parent
        self._tmp: Path | None = None

    def _merged(self, job: Job) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=".merge-lab-merged-", dir=self.parent))
            merge_to_disk(job.recipe, self._tmp / "model", device=job.device, progress=job.progress)
        return self._tmp / "model"

    @contextmanager
    def weights(self, job: Job, merged: bool):
        """A folder holding the weights (read lazily, tensor by tensor)."""
        yield self._merged(job) if merged else hub.resolve(job.triple[0])

    @contextmanager
    def model(self, job: Job, merged: bool, attentions: bool = False):
        with self.weights(job, merged) as folder:
            yield load_model(folder, job.device, attentions=attentions)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
