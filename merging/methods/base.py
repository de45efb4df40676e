"""What a merge method is: its knobs, its scope, the tensors it is handed, and what the other layers
read from it (the leaderboard's grid, its paper, the app's knob toggles, its diagnostics' summaries)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = (float, int, bool)


@dataclass(frozen=True)
class Param:
    """One knob: default, allowed range (inclusive), a one-line hint for the UI.

    `kind` is the Python type merging.params.resolve hands the method: float, int (rounded) or
    bool (on at >= 0.5). Recipes, URLs and the UI keep writing int and bool knobs as whole numbers
    (0/1 for a bool), so `default`, `lo` and `hi` stay numbers.
    """

    name: str
    default: float
    lo: float
    hi: float
    hint: str
    kind: type = float
    per_layer: bool = True  # may be given as a per-layer list / gradient
    aliases: tuple[str, ...] = ()  # old names still accepted in recipes (mapped to `name`)
    # An int knob that picks one of a few rules: the rules' names, value 0 first. Recipes may
    # write the name (`rescale: l1`); the knob still holds the number.
    choices: tuple[str, ...] = ()
    # An int knob naming a decoder layer: on a given model it ends at the last layer (sliders, tuner).
    layer_index: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"knob {self.name!r}: kind must be one of float, int, bool")
        if self.kind is bool and (self.lo, self.hi) != (0, 1):
            raise ValueError(f"knob {self.name!r}: a bool knob ranges over 0..1")
        if self.choices and (self.kind is not int or (self.lo, self.hi) != (0, len(self.choices) - 1)):
            raise ValueError(f"knob {self.name!r}: a knob with named choices is an int from 0 to their count - 1")

    def bounds(self, num_layers: int | None = None) -> tuple[float, float]:
        """(lo, hi) on a model of num_layers decoder layers: a layer knob ends at the last layer."""
        if self.layer_index and num_layers:
            return self.lo, min(self.hi, num_layers - 1)
        return self.lo, self.hi

    def choice(self, value) -> str:
        """The name of a choice knob's value (e.g. "l1" for rescale 0)."""
        return self.choices[int(round(float(value)))]

    @property
    def integer(self) -> bool:
        """Whole numbers only (int and bool knobs): what recipes, URLs and sliders check."""
        return self.kind is not float

    def typed(self, value: float):
        """A resolved value as this knob's kind."""
        if self.kind is bool:
            return value >= 0.5
        if self.kind is int:
            return int(round(value))
        return float(value)


@dataclass(frozen=True)
class Paper:
    """The paper a method follows: a short name (the glossary's key), the citation and its arXiv link."""

    short: str
    title: str
    url: str


@dataclass(frozen=True)
class Toggle:
    """A bool knob the app shows as a checkbox of its own, outside the knob pools; each of its two
    states hides the knobs that mean nothing in it (the recipe drops them)."""

    knob: str
    label: str
    info: str = ""
    hides_when_on: tuple[str, ...] = ()
    hides_when_off: tuple[str, ...] = ()

    def hides(self, on: bool) -> tuple[str, ...]:
        return self.hides_when_on if on else self.hides_when_off


def mergekit_value(value):
    """A knob as mergekit takes it: a number, or a list (per layer, or a gradient: the lab's
    gradients are mergekit's)."""
    return [float(v) for v in value] if isinstance(value, list) else float(value)


def layer_key(layer: int | None) -> str:
    """A decoder layer as the merge report's JSON keys it; "other" for tensors outside the layers."""
    return "other" if layer is None else str(layer)


@dataclass
class TensorSet:
    """The same canonical LM tensor from the three models, on the compute device and dtype."""

    name: str
    layer: int | None
    vlm: torch.Tensor
    reasoner: torch.Tensor
    base: torch.Tensor | None = None


@dataclass
class Diagnostics:
    """What a merge records as it runs: each method's own diagnostics (`methods`, under the method's
    name; "gta" for the three GTA methods), the change sums per canonical tensor the merge report is
    built from (`changes`: {name: {"layer", "diff2", "ref2"}}, merging/merge_report.py) and, once the
    merge is done, the report itself (`report`)."""

    methods: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, dict] = field(default_factory=dict)
    report: dict | None = None

    def of(self, key: str) -> dict:
        """The store under `key` (a method's name), empty on first use."""
        return self.methods.setdefault(key, {})

    def add_change(self, name: str, layer: int | None, diff2: float, ref2: float) -> None:
        """Add ||W - W_v||^2 and ||W_v||^2 of one merged tensor, or block of its rows, to its sums."""
        entry = self.changes.setdefault(name, {"layer": layer, "diff2": 0.0, "ref2": 0.0})
        entry["diff2"] += diff2
        entry["ref2"] += ref2

    def as_dict(self) -> dict:
        """{method key: its diagnostics, ..., "changes": the sums, "report": the merge report}, the last
        two only once recorded: what InPlaceMerger.apply returns and summarize_diagnostics reads."""
        out = dict(self.methods)
        if self.changes:
            out["changes"] = self.changes
        if self.report is not None:
            out["report"] = self.report
        return out


@dataclass
class MergeContext:
    """What a merge hands every method besides the tensors and knobs."""

    seed: int = 0
    device: str = "cpu"
    num_layers: int = 0
    # The triple's checkpoint fingerprints by role, where the merger has them: ip_merging files its
    # decompositions under them for the analyses, frism its learned gates.
    fingerprints: dict[str, str] | None = None
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    # Given by the in-place merger: frees what it holds that it can read again (its copies of the
    # reasoner's and the base's tensors, spare buffers). A method about to need memory of its own (frism's
    # learning, which loads a second VLM) calls it first; a merge to disk has nothing to free.
    release: Callable[[], None] | None = None

    def generator(self, name: str, device: str | None = None) -> torch.Generator:
        """A generator seeded from the recipe seed and the tensor's canonical name.

        Seeding per tensor (not per run) makes DARE give the same tensors whether a model
        is streamed from disk or merged in place, and whatever order tensors come in.
        device="cpu" gives the same stream whatever the compute device (DARE uses it).
        """
        g = torch.Generator(device=device or self.device)
        g.manual_seed((int(self.seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        return g


class MergeMethod:
    """Base class. Subclasses set name/params and implement merge_tensor or merge_layer; the rest
    has a default that does nothing method-specific."""

    name: str = ""
    needs_base: bool = True
    scope: str = "tensor"  # "tensor": one tensor at a time; "layer": a whole decoder block
    # True when each output element depends only on the same element of the inputs: the engine
    # may then stream a tensor through the method a block of rows at a time (less memory, and
    # the rows stay in cache between the method's passes). Its merge_tensor may then run on several
    # threads at once (the in-place merger's blocks): it must not change shared state or its inputs.
    elementwise: bool = False
    params: tuple[Param, ...] = ()
    description: str = ""
    default: bool = False  # the method the app opens with: exactly one registered method sets it
    paper: Paper | None = None
    toggle: Toggle | None = None
    # Learns from the VLM's own answers to perception prompts: the recipe's `prompts:` file, or the bundled
    # family's scenes (other methods refuse that key).
    learns_from_prompts: bool = False

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def validate(self, params: dict) -> None:
        """Checks across knobs, on the recipe's parameters as given (each is already in range);
        raise LabError to refuse the recipe. Default: none."""

    def grid(self, num_layers: int) -> list[dict]:
        """Knob settings the leaderboard tries on its dev split, besides the defaults it always
        scores. Default: [{}], the defaults only (the method is ranked untuned, never skipped)."""
        return [{}]

    def variants(self, num_layers: int) -> list[tuple[str, dict]]:
        """Settings the leaderboard scores on the held-out suites as rows of their own, (label, knobs),
        besides the defaults and the best on dev (e.g. frank's two forms of its prior). Default: none."""
        return []

    def attention_knobs(self, beta: float) -> dict:
        """The knobs that put the attention analysis' fitted decay rate `beta` to use (the app's
        "use this beta" button); {} when the method takes none."""
        return {}

    def summarize_diagnostics(self, extra: dict) -> tuple[dict, list[str]]:
        """The merge report's `diagnostics` entries from what this method recorded (`extra`:
        ctx.diagnostics.as_dict(), the dict InPlaceMerger.apply returns), and its warnings. Default: none."""
        return {}, []

    def selection_details(self, extra: dict) -> str:
        """One line for the leaderboard on what the merge selected, from ctx.diagnostics.as_dict().
        Default: ''."""
        return ""

    def report_lines(self, diagnostics: dict) -> list[str]:
        """Short lines on the report's diagnostics (CLI stdout, the app's status). Default: none."""
        return []

    def layer_note(self, diagnostics: dict, layer: str) -> str:
        """The report's per-layer figure: this method's note on one layer's bar. Default: ''."""
        return ""

    def diagnostic_grid(self, diagnostics: dict) -> dict | None:
        """A per-layer grid of this method's learned or chosen values for the report's figure:
        {"title", "rows" (layer labels), "cols", "z" (rows x cols, None where absent), "hover" (same
        shape, text), "zmin", "zmax"}. Default: None (the figure shows the change bars only)."""
        return None

    def to_mergekit(self, recipe, knobs: dict) -> dict | None:
        """The recipe as a mergekit config of the same semantics (merge_method, models with their
        parameters, parameters), for the model card; None where mergekit has no such method."""
        return None

    def mergekit_gap(self, knobs: dict) -> str:
        """Why to_mergekit gave None for these knobs (the model card says it)."""
        return f"`{self.name}` has no mergekit merge method"

    def prepare(self, recipe, ctx: MergeContext, progress=None, cancel=None) -> None:
        """Work done once per merge before any tensor, by both mergers (frism learns its gates here,
        into ctx.diagnostics); progress(done, total, message) and cancel() as the merge's. Default: none."""

    def merge_tensor(self, t: TensorSet, p: dict, ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError

    def merge_layer(self, layer: int, sets: dict[str, TensorSet], p: dict, ctx: MergeContext) -> dict[str, torch.Tensor]:
        """Default for tensor-scope methods: merge each tensor of the block on its own."""
        return {name: self.merge_tensor(t, p, ctx) for name, t in sets.items()}
