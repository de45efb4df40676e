"""The recipe: what to merge and how (README "Commands"). Loaded from YAML, validated before any work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from merging import methods
from merging.errors import LabError

KEYS = ("vlm", "reasoner", "base", "method", "parameters", "layers", "embeddings", "dtype", "out_dtype", "seed", "drift",
        "prompts")
EMBEDDINGS = ("keep_vlm", "merge_shared_rows")
DTYPES = ("float32", "float16", "bfloat16", "float64")
# Bounds on what a recipe (or the app's per-layer box) may be: a real one is well under 1 KB,
# a per-layer list has one value per decoder layer.
MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_NODES = 10_000
MAX_LIST = 1024
MAX_SEED = 2**63 - 1


def _show(v, limit: int = 60) -> str:
    """A value for a one-line message: its repr, cut short (a 4000-digit number is one line too)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, while composing (before any value is built or any alias
    expanded), anchors and aliases (the alias bomb), nesting deeper than MAX_DEPTH, more than
    MAX_NODES values, lists longer than MAX_LIST and duplicate keys."""

    def __init__(self, text: str, what: str):
        super().__init__(text)
        self.what, self.depth, self.nodes = what, 0, 0

    def _refuse(self, node_or_event, why: str) -> LabError:
        return LabError(f"{self.what}: {why} (line {node_or_event.start_mark.line + 1})")

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise self._refuse(event, "YAML anchors and aliases (&name, *name) are not allowed; write values out")
        self.depth += 1
        self.nodes += 1
        if self.depth > MAX_DEPTH:
            raise self._refuse(event, f"nested deeper than {MAX_DEPTH} levels")
        if self.nodes > MAX_NODES:
            raise self._refuse(event, f"more than {MAX_NODES} values")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if isinstance(node, yaml.SequenceNode) and len(node.value) > MAX_LIST:
            raise self._refuse(node, f"a list of {len(node.value)} values; at most {MAX_LIST}")
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise self._refuse(key_node, f"duplicate key {_show(key)}")
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str | bytes, what: str = "recipe"):
    """The value of a small YAML document (a recipe, the app's per-layer box), bounded and
    without aliases: every refusal is a LabError of one line."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise LabError(f"{what} is {len(text)} bytes; the limit is {MAX_BYTES // 1024} KB")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LabError(f"{what} is not UTF-8 text (byte {e.start} is 0x{text[e.start]:02x})") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise LabError(f"{what} is longer than {MAX_BYTES // 1024} KB")
    try:
        loader = _Loader(text, what)  # its reader refuses control characters (a NUL byte) at once
    except yaml.reader.ReaderError as e:
        char = e.character if isinstance(e.character, int) else ord(e.character)
        raise LabError(f"{what} is not valid YAML: character #x{char:04x} at position {e.position} is not "
                       "allowed") from None
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise LabError(f"{what} is not valid YAML: {e.problem or e.context or 'unreadable'}{where}") from None
    except yaml.YAMLError as e:
        raise LabError(f"{what} is not valid YAML: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    except (ValueError, RecursionError) as e:  # an integer past Python's 4300-digit limit, a bad date
        why = "a number with too many digits" if "digits" in str(e) else str(e).splitlines()[0][:120]
        raise LabError(f"{what} has a value that cannot be read: {why}") from None
    finally:
        loader.dispose()


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
    prompts: str | None = None  # a JSONL of image + question (answers unused) a method learns from

    def knobs(self) -> dict:
        """The method's defaults overlaid with the recipe's parameters."""
        return {**methods.get(self.method).defaults(), **self.parameters}

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])
        return {k: v for k, v in d.items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def knobs_text(parameters: dict | None) -> str:
    """A recipe's knobs in a line: 'alpha 0.5, density 0.7', a list as 'alpha per layer'."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} per layer"
                     for k, v in (parameters or {}).items())


def resolve_ref(ref: str, recipe_dir: Path | None) -> str:
    """Local paths are taken relative to the working directory, then to the recipe's folder."""
    p = Path(ref).expanduser()
    try:
        if p.is_absolute() or p.exists():
            return str(p)
        if recipe_dir is not None and (recipe_dir / p).exists():
            return str((recipe_dir / p).resolve())
    except OSError as e:  # ENAMETOOLONG and the like: a bad reference, said in one line
        raise LabError(f"model reference {_show(ref)}: {e.strerror or e}") from None
    return ref  # a hub id (or a missing path: the checkpoint layer names it)


def _check_value(method_name: str, spec, value, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not spec.per_layer:
        raise LabError(f"{where} must be a single number, not a list")
    if isinstance(value, list) and len(value) == 0:
        raise LabError(f"{where} is an empty list; give a number or one value per layer")
    if len(values) > MAX_LIST:
        raise LabError(f"{where} is a list of {len(values)} values; at most {MAX_LIST}")
    for v in values:
        # abs(v) first: math.isfinite overflows on integers past the float range (10**400)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > 1e308 or not math.isfinite(v):
            raise LabError(f"{where} must be a finite number, got {_show(v)}")
        if spec.integer and int(v) != v:
            raise LabError(f"{where} must be a whole number, got {_show(v)}")
        if not (spec.lo <= v <= spec.hi):
            raise LabError(f"{where} = {v} is out of range; allowed {spec.lo} to {spec.hi}")


def _choice_index(spec, name: str, where: str) -> int:
    """A rule knob written by name (`rescale: l1`) as the number the knob holds."""
    if name not in spec.choices:
        raise LabError(f"{where} must be one of {', '.join(spec.choices)} (or 0 to {len(spec.choices) - 1}), "
                       f"got {_show(name)}")
    return spec.choices.index(name)


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LabError(f"'seed' must be a whole number from 0 to 2**63-1, got {_show(seed)}")
    return seed


def _canonical_names(method, params: dict) -> dict:
    """Knobs given by an old name (Param.aliases, e.g. ties' `lambda`) under their current one."""
    for p in method.params:
        for old in p.aliases:
            if old in params:
                if p.name in params:
                    raise LabError(f"parameter {p.name!r} given twice for method {method.name!r}: "
                                   f"as {p.name!r} and by its old name {old!r}")
                params[p.name] = params.pop(old)
    return params


def _prompts(method, value, recipe_dir: Path | None) -> str | None:
    """The `prompts:` file as an absolute path (relative to the recipe's folder), for a method that
    learns from prompts; LabError for another method, a non-string or a missing file."""
    if value is None:
        return None
    if not method.learns_from_prompts:
        users = [m.name for m in methods.all_methods() if m.learns_from_prompts]
        raise LabError(f"'prompts' is used only by {', '.join(users)}; method {method.name!r} learns nothing")
    if not isinstance(value, str) or not value.strip():
        raise LabError(f"'prompts' must be the path of a .jsonl file, got {_show(value)}")
    path = Path(value).expanduser()
    if not path.is_absolute() and recipe_dir is not None:
        path = recipe_dir / path
    if not path.is_file():
        raise LabError(f"prompts file not found: {_show(value)}")
    return str(path.resolve())


def from_dict(d: dict, recipe_dir: Path | None = None) -> Recipe:
    if not isinstance(d, dict):
        raise LabError("the recipe must be a YAML mapping with keys vlm, reasoner, base, method, parameters")
    unknown = [k for k in d if k not in KEYS]
    if unknown:
        raise LabError(f"unknown recipe key {_show(unknown[0])}; allowed keys: {', '.join(KEYS)}")
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
    params = _canonical_names(method, dict(params))
    for k, v in params.items():
        if k in allowed and isinstance(v, bool) and allowed[k].integer and (allowed[k].lo, allowed[k].hi) == (0, 1):
            params[k] = v = int(v)  # on/off knobs (normalize, use_prior) may be written true/false
        if k in allowed and isinstance(v, str) and allowed[k].choices:
            params[k] = v = _choice_index(allowed[k], v, f"parameter {k!r}")
        if k not in allowed:
            raise LabError(f"unknown parameter {k!r} for method {method.name!r}; allowed: {', '.join(allowed) or 'none'}")
        _check_value(method.name, allowed[k], v, f"parameter {k!r}")
    method.validate(params)
    layers = d.get("layers")
    if layers is not None:
        if (not isinstance(layers, list) or len(layers) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise LabError(f"'layers' must be [start, end] (inclusive decoder-layer indices), got {_show(layers)}")
        if layers[0] < 0 or layers[1] < layers[0]:
            raise LabError(f"'layers' {layers} must satisfy 0 <= start <= end")
        layers = (layers[0], layers[1])
    emb = d.get("embeddings", "keep_vlm")
    if emb not in EMBEDDINGS:
        raise LabError(f"'embeddings' must be one of {', '.join(EMBEDDINGS)}, got {emb!r}")
    for k in ("dtype", "out_dtype"):
        if d.get(k) is not None and d[k] not in DTYPES:
            raise LabError(f"'{k}' must be one of {', '.join(DTYPES)}, got {d[k]!r}")
    seed = _seed(d.get("seed", 0))
    drift = d.get("drift")
    if drift is not None and not isinstance(drift, dict):
        raise LabError("'drift' must be a mapping (steps, lr, mode, alpha)")
    prompts = _prompts(method, d.get("prompts"), recipe_dir)
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
        prompts=prompts,
    )


def read_yaml(path: str | Path) -> tuple[dict, Path]:
    """The recipe file's mapping with its unknown keys refused, and the folder it lives in."""
    path = Path(path)
    name = str(path) if len(str(path)) <= 240 else str(path)[:237] + "..."
    try:
        if not path.is_file():
            raise LabError(f"recipe file not found: {name}")
        if path.stat().st_size > MAX_BYTES:
            raise LabError(f"recipe {name} is {path.stat().st_size} bytes; the limit is {MAX_BYTES // 1024} KB")
        raw = path.read_bytes()
        here = path.resolve().parent
    except OSError as e:  # a name too long, a folder we may not read
        raise LabError(f"recipe {name}: {e.strerror or e}") from None
    data = parse_yaml(raw, f"recipe {name}")
    if not isinstance(data, dict):
        raise LabError("the recipe must be a YAML mapping with keys vlm, reasoner, base, method, parameters")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise LabError(f"unknown recipe key {_show(unknown[0])}; allowed keys: {', '.join(KEYS)}")
    return data, here


def load(path: str | Path) -> Recipe:
    data, here = read_yaml(path)
    return from_dict(data, here)
