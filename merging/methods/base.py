"""What a merge method is: its knobs, its scope, and the tensors it is handed."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Param:
    """One knob: default, allowed range (inclusive), a one-line hint for the UI."""

    name: str
    default: float
    lo: float
    hi: float
    hint: str
    integer: bool = False
    per_layer: bool = True  # may be given as a per-layer list / gradient
    aliases: tuple[str, ...] = ()  # old names still accepted in recipes (mapped to `name`)


@dataclass
class TensorSet:
    """The same canonical LM tensor from the three models, on the compute device and dtype."""

    name: str
    layer: int | None
    vlm: torch.Tensor
    reasoner: torch.Tensor
    base: torch.Tensor | None = None


@dataclass
class MergeContext:
    seed: int = 0
    device: str = "cpu"
    num_layers: int = 0
    extra: dict = field(default_factory=dict)  # method inputs that are not knobs (e.g. FRANK's prior)

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
    """Base class. Subclasses set name/params and implement merge_tensor or merge_layer."""

    name: str = ""
    needs_base: bool = True
    scope: str = "tensor"  # "tensor": one tensor at a time; "layer": a whole decoder block
    # True when each output element depends only on the same element of the inputs: the engine
    # may then stream a tensor through the method a block of rows at a time (less memory, and
    # the rows stay in cache between the method's passes).
    elementwise: bool = False
    params: tuple[Param, ...] = ()
    description: str = ""

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

    def merge_tensor(self, t: TensorSet, p: dict, ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError

    def merge_layer(self, layer: int, sets: dict[str, TensorSet], p: dict, ctx: MergeContext) -> dict[str, torch.Tensor]:
        """Default for tensor-scope methods: merge each tensor of the block on its own."""
        return {name: self.merge_tensor(t, p, ctx) for name, t in sets.items()}
