"""The recipe: what to merge and how (DESIGN.md section 6). Loaded from YAML, validated before any work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from merging.errors import LabError

KEYS = ("vlm", "reasoner", "base", "method", "parameters", "layers", "embeddings", "dtype", "out_dtype", "seed", "drift")
EMBEDDINGS = ("keep_vlm", "merge_shared_rows")
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class Recipe:
    vlm: str
    reasoner: str
    method: str
    base: str | None = None
    parameters: dict = field(default_factory=dict)
    layers: tuple[int, int] | None = None
    embeddings: str = "keep_vlm"
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    drift: dict | None = None

    def knobs(self) -> dict:
        """The method's defaults overlaid with the recipe's parameters."""
        from merging import methods

        return {**methods.get(self.method).defaults(), **self.parameters}

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])
        return {k: v for k, v in d.items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve_ref(ref: str, recipe_dir: Path | None) -> str:
    """Local paths are taken relative to the working directory, then to the recipe's folder."""
    p = Path(ref).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    if recipe_dir is not None and (recipe_dir / p).exists():
        return str((recipe_dir / p).resolve())
    return ref  # a hub id (or a missing path: the checkpoint layer names it)


def _check_value(method_name: str, spec, value, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not spec.per_layer:
        raise LabError(f"{where} must be a single number, not a list")
    if isinstance(value, list) and len(value) == 0:
        raise LabError(f"{where} is an empty list; give a number or one value per layer")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LabError(f"{where} must be a finite number, got {v!r}")
        if spec.integer and int(v) != v:
            raise LabError(f"{where} must be a whole number, got {v!r}")
        if not (spec.lo <= v <= spec.hi):
            raise LabError(f"{where} = {v} is out of range; allowed {spec.lo} to {spec.hi}")


def from_dict(d: dict, recipe_dir: Path | None = None) -> Recipe:
    from merging import methods

    if not isinstance(d, dict):
        raise LabError("the recipe must be a YAML mapping with keys vlm, reasoner, base, method, parameters")
    unknown = [k for k in d if k not in KEYS]
    if unknown:
        raise LabError(f"unknown recipe key {unknown[0]!r}; allowed keys: {', '.join(KEYS)}")
    for k in ("vlm", "reasoner", "method"):
        if not d.get(k) or not isinstance(d[k], str):
            raise LabError(f"recipe key {k!r} is missing or not a string")
    method = methods.get(d["method"])
    base = d.get("base")
    if method.needs_base and not base:
        raise LabError(f"method {method.name!r} needs 'base' (the shared base LLM) in the recipe")
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise LabError("recipe 'parameters' must be a mapping of knob -> value")
    allowed = {p.name: p for p in method.params}
    params = dict(params)
    for k, v in params.items():
        if k in allowed and isinstance(v, bool) and allowed[k].integer and (allowed[k].lo, allowed[k].hi) == (0, 1):
            params[k] = v = int(v)  # on/off knobs (normalize, use_prior) may be written true/false
        if k not in allowed:
            raise LabError(f"unknown parameter {k!r} for method {method.name!r}; allowed: {', '.join(allowed) or 'none'}")
        _check_value(method.name, allowed[k], v, f"parameter {k!r}")
    if hasattr(method, "validate"):
        method.validate(params)
    layers = d.get("layers")
    if layers is not None:
        if (not isinstance(layers, list) or len(layers) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise LabError(f"'layers' must be [start, end] (inclusive decoder-layer indices), got {layers!r}")
        if layers[0] < 0 or layers[1] < layers[0]:
            raise LabError(f"'layers' {layers} must satisfy 0 <= start <= end")
        layers = (layers[0], layers[1])
    emb = d.get("embeddings", "keep_vlm")
    if emb not in EMBEDDINGS:
        raise LabError(f"'embeddings' must be one of {', '.join(EMBEDDINGS)}, got {emb!r}")
    for k in ("dtype", "out_dtype"):
        if d.get(k) is not None and d[k] not in DTYPES:
            raise LabError(f"'{k}' must be one of {', '.join(DTYPES)}, got {d[k]!r}")
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LabError(f"'seed' must be a non-negative whole number, got {seed!r}")
    drift = d.get("drift")
    if drift is not None and not isinstance(drift, dict):
        raise LabError("'drift' must be a mapping (steps, lr, mode, alpha)")
    return Recipe(
        vlm=resolve_ref(d["vlm"], recipe_dir),
        reasoner=resolve_ref(d["reasoner"], recipe_dir),
        base=resolve_ref(base, recipe_dir) if base else None,
        method=method.name,
        parameters=dict(params),
        layers=layers,
        embeddings=emb,
        dtype=d.get("dtype", "float32"),
        out_dtype=d.get("out_dtype"),
        seed=seed,
        drift=drift,
    )


def read_yaml(path: str | Path) -> tuple[dict, Path]:
    """The recipe file's mapping with its unknown keys refused, and the folder it lives in."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LabError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LabError("the recipe must be a YAML mapping with keys vlm, reasoner, base, method, parameters")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise LabError(f"unknown recipe key {unknown[0]!r}; allowed keys: {', '.join(KEYS)}")
    return data, path.resolve().parent


def load(path: str | Path) -> Recipe:
    data, here = read_yaml(path)
    return from_dict(data, here)
