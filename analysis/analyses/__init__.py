"""The analyses, one file each, registered by name (as merging.methods registers the merge methods).

An analysis declares its name, its knobs (with ranges and hints), which weights it needs, how its
result is keyed in the cache, how it is computed and which figures (analysis.figures, by function
name) show it. analysis.runner drives them for the CLI report and for the app's worker, and the
app's panel is generated from this list, so both share one cached result per question asked.

Each file here, <name>_spec.py, is the analysis as the runner and the app see it (knobs, cache key,
figures); its computation lives in analysis/<name>.py. Adding an analysis: write
analysis/analyses/<name>_spec.py with an Analysis subclass decorated by @register, and add its
module name to _MODULES below (merging.registry: a missing file is an ImportError).
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.errors import LabError
from merging.registry import Registry

# Display order in the app's panel and in the report.
_MODULES = ("similarity_spec", "spectra_spec", "attention_spec", "knockout_spec", "changes_spec")


@dataclass(frozen=True)
class Knob:
    """One setting of an analysis. kind "int": a slider lo..hi; "text": a line; "images": files.
    `api` is the keyword of the app's API (default: the name), `cli` the report's flag (default:
    ANALYSIS-NAME)."""

    name: str
    default: object
    label: str
    hint: str = ""
    kind: str = "int"
    lo: int = 0
    hi: int = 0
    api: str = ""
    cli: str = ""

    @property
    def api_name(self) -> str:
        return self.api or self.name

    def flag(self, analysis: str) -> str:
        return f"--{self.cli or f'{analysis}-{self.name}'}"

    def dest(self, analysis: str) -> str:
        """The argparse attribute of the flag: one namespace per analysis, whatever the flag."""
        return f"{analysis}_{self.name}"

    def value(self, given):
        """The knob's value from a request (None: the default), checked against its range."""
        if given is None or (self.kind != "int" and not given):
            return self.default
        if self.kind != "int":
            return given
        v = int(given)
        if not self.lo <= v <= self.hi:
            raise LabError(f"{self.name} must be in {self.lo}..{self.hi}, got {v}")
        return v


@dataclass(frozen=True)
class Figure:
    """One figure of an analysis: the analysis.figures function, its file name in the report,
    its label and element id in the app."""

    builder: str
    file: str
    label: str
    elem_id: str


class Analysis:
    """Base class. Subclasses set the declarations and implement key() and compute()."""

    name: str = ""
    title: str = ""
    about: str = ""  # the panel's explanation
    knobs: tuple[Knob, ...] = ()
    figures: tuple[Figure, ...] = ()
    needs_base: bool = False  # reads the base model's weights (task vectors)
    on_merge: bool = False  # also analyses the recipe's merge (the app then takes the recipe's triple)
    needs_merge: bool = False  # nothing to show without a merge
    slow: str = ""  # why the report runs it only when asked (--NAME); "" runs it always
    changes_weights: bool = False  # writes the model's weights while it runs (no chat between its steps)

    def params(self, given: dict) -> dict:
        """Every knob's value: from `given` (by name), else its default."""
        return {k.name: k.value(given.get(k.name)) for k in self.knobs}

    def skip(self, job) -> str | None:
        """Why this analysis cannot run for the job (None: it can)."""
        if self.needs_base and not job.triple[2]:
            return "the recipe has no base model, so there are no task vectors"
        if self.needs_merge and job.recipe is None:
            return "merge first: this analysis compares the merged model with the VLM"
        return None

    def run(self, job, p: dict) -> dict:
        """The result, from the cache when the same key was computed before."""
        raise NotImplementedError

    def summary(self, data: dict, p: dict) -> str:
        return ""


_registry = Registry("analysis", __name__, _MODULES)
register, names, get = _registry.register, _registry.names, _registry.get
