"""What a merged folder carries for the tools that come after the lab: the model card's Hugging Face
front matter and mergekit block, and an lmms-eval task that scores the folder on a JSONL set in
the lab's own format (analysis/eval_file.py) the way `python -m analysis eval --suite-file` does.

The lmms-eval files are plain text written into `lmms_eval_task/` of the folder; they import
nothing of the lab (lmms-eval runs in its own environment), so the answer rule is copied into them
from tasks.toydata here, at write time, and cannot drift from the lab's scorer.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

import yaml

from merging import methods
from merging.errors import write_error
from merging.writer import write_text
from tasks.toydata import ANSWER_RE

TASK_DIR = "lmms_eval_task"
TASK_NAME = "merge_lab_items"
TASK_YAML = f"{TASK_NAME}.yaml"
UTILS = "merge_lab_utils.py"
DATA_FILE = "items.jsonl"  # the task's default set, beside the YAML; the YAML says how to point elsewhere
MAX_NEW_TOKENS = 24  # analysis.evaluate.MAX_NEW_TOKENS (merging may not import analysis)

# config.json model_type -> the lmms-eval model (lmms_eval/models/__init__.py of lmms-eval 0.7.3).
# llava_hf loads llava, llava_next and llava_onevision through transformers' own classes.
LMMS_EVAL_MODELS = {
    "llava": "llava_hf", "llava_next": "llava_hf", "llava_onevision": "llava_hf",
    "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "idefics2": "idefics2",
    "mistral3": "mistral3_vl", "gemma3": "gemma3",
}
# lmms-eval has no model of its own for the others (idefics3, smolvlm, paligemma, inferred
# families); its generic chat model loads any AutoModelForImageTextToText folder.
FALLBACK_MODEL = "huggingface"

def lmms_eval_model(model_type: str) -> str:
    return LMMS_EVAL_MODELS.get(model_type, FALLBACK_MODEL)


def lmms_eval_command(model_type: str, model: str = ".", device: str = "cuda") -> str:
    """The lmms-eval command line for the folder `model`, run from the folder that holds TASK_DIR
    (the merged folder itself by default)."""
    name = lmms_eval_model(model_type)
    # device_map named always: llava_hf's default "" is refused by transformers 5, and the
    # others default to "auto" or "cuda", wrong on a CPU.
    args = f"pretrained={model},device={device},device_map={device}"
    return (f"python -m lmms_eval --model {name} --model_args {args} --tasks {TASK_NAME} "
            f"--include_path {TASK_DIR} --batch_size 1 --output_path lmms_eval_out")


def task_yaml(data_file: str = DATA_FILE) -> str:
    """The task: the lab's JSONL through datasets' json builder, greedy, the lab's token budget,
    exact match of the lab's answer rule. A relative data_file is taken from this YAML's folder."""
    return f"""\
# lmms-eval task for an eval set in the merge lab's format, one JSON object a line:
#   {{"question": str, "answer": str, "image": "path relative to the JSONL" or null, "id": str}}
# It scores the way `python -m analysis eval MODEL --suite-file items.jsonl` does: greedy, at most
# {MAX_NEW_TOKENS} new tokens, the X of the first "the answer is X" equal to the answer (lower case).
# Point data_files at your JSONL (relative to this folder, or absolute); ids all strings or all numbers.
task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data_file)}
test_split: test
output_type: generate_until
doc_to_visual: !function merge_lab_utils.doc_to_visual
doc_to_text: !function merge_lab_utils.doc_to_text
doc_to_target: answer
process_results: !function merge_lab_utils.process_results
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
  until: []  # the lab stops at end-of-sequence or the token budget only
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


# The hooks' source; $-fields filled by utils_py (the file has no other $).
_UTILS = Template('''\
"""lmms-eval hooks for a merge-lab eval set (written by the merge lab; see $task_yaml).

Scored as `python -m analysis eval --suite-file` scores it: the answer is the X of the first
"the answer is X" in the generation, lower case, and must equal the item's answer, stripped and
lower case. An image path is relative to the JSONL's folder and must stay inside it.
"""

import functools
import re
from pathlib import Path

import yaml
from PIL import Image

ANSWER_RE = re.compile($answer_pattern, re.IGNORECASE)
TASK_YAML = Path(__file__).with_name($task_yaml_repr)


class _Loader(yaml.SafeLoader):
    """Reads the task YAML without importing what its !function tags name."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@functools.lru_cache(maxsize=1)
def data_dir() -> Path:
    """The folder of the JSONL that the task YAML names: item images are relative to it."""
    files = yaml.load(TASK_YAML.read_text(), Loader=_Loader)["dataset_kwargs"]["data_files"]
    first = files["test"] if isinstance(files, dict) else files
    first = first[0] if isinstance(first, list) else first
    path = Path(first)
    return (path if path.is_absolute() else TASK_YAML.parent / path).resolve().parent


def doc_to_visual(doc):
    ref = doc.get("image")
    if not ref:
        return []
    root = data_dir()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image {ref!r} lies outside the JSONL's folder")
    with Image.open(path) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return str(doc["question"]).strip()


def parse_answer(text):
    m = ANSWER_RE.search(text)
    return m.group(1).lower() if m else None


def process_results(doc, results):
    ok = parse_answer(str(results[0])) == str(doc["answer"]).strip().lower()
    return {"exact_match": float(ok)}
''')


def utils_py() -> str:
    """The task's hooks, standalone: Pillow and PyYAML only (both come with lmms-eval)."""
    return _UTILS.substitute(task_yaml=TASK_YAML, task_yaml_repr=repr(TASK_YAML), answer_pattern=repr(ANSWER_RE.pattern))


def lmms_eval_files() -> dict[str, str]:
    """Relative path in the merged folder -> text."""
    return {f"{TASK_DIR}/{TASK_YAML}": task_yaml(), f"{TASK_DIR}/{UTILS}": utils_py()}


def write_lmms_eval_task(folder: Path, data_file: str = DATA_FILE) -> Path:
    """Write the task into folder/TASK_DIR (data_file: the JSONL it reads); returns that folder.
    A failed write is a WriteError, as for every other file of a merge."""
    out = Path(folder) / TASK_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    write_text(out / TASK_YAML, task_yaml(data_file))
    write_text(out / UTILS, utils_py())
    return out


def vlm_model_type(folder: Path) -> str | None:
    """The model_type of a model folder whose config has a vision part, else None."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "vision_config" not in config:
        return None
    return str(config.get("model_type", ""))


# ------------------------------------------------------------------------------ model card
def front_matter(refs: dict, method: str) -> str:
    """Hugging Face model-card metadata: the VLM and the reasoner as base models of a merge."""
    meta = {"base_model": [refs["vlm"], refs["reasoner"]], "base_model_relation": "merge",
            "library_name": "transformers", "tags": ["merge", method]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def mergekit_config(recipe, knobs: dict) -> dict | None:
    """The recipe as a mergekit config of the same semantics (the method's own translation), or None."""
    config = methods.get(recipe.method).to_mergekit(recipe, knobs)
    return None if config is None else {**config, "dtype": recipe.dtype}


def mergekit_section(recipe, knobs: dict) -> list[str]:
    """The model card's mergekit section: the config block, or why there is none."""
    config = mergekit_config(recipe, knobs)
    if config is None:
        why = methods.get(recipe.method).mergekit_gap(knobs)
        return ["## mergekit", "", f"No mergekit equivalent: {why}. The lab's recipe is in `recipe.yaml`."]
    kept = "vision tower, projector and embeddings" if recipe.embeddings == "keep_vlm" else "vision tower and projector"
    lines = ["## mergekit", "",
             f"The same merge in mergekit's config format. It describes the language model only: the lab kept "
             f"the VLM's {kept}, and mergekit cannot read a VLM and a text LLM as one architecture."]
    if recipe.layers is not None:
        lines[-1] += f" Only decoder layers {recipe.layers[0]}-{recipe.layers[1]} were merged here; the others are the VLM's."
    if config.get("parameters", {}).get("rescale"):
        lines[-1] += (" One difference in scale: mergekit's `rescale` scales DARE's surviving entries so each "
                      "task vector keeps its L1 norm; the lab divides them by `density` (the DARE paper's rule). "
                      "Both keep the expected value; the masks are random in both.")
    return lines + ["", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]


def lmms_eval_section(model_type: str) -> list[str]:
    """The model card's lmms-eval section: the model type, the command and the task files."""
    name = lmms_eval_model(model_type)
    return ["## Benchmark with lmms-eval", "",
            f"lmms-eval model type for this `{model_type}` model: `{name}`. `{TASK_DIR}/` holds a task "
            f"(`{TASK_YAML}`, `{UTILS}`) for a JSONL set in the lab's format, scored as "
            "`python -m analysis eval MODEL --suite-file items.jsonl` scores it. Put the set at "
            f"`{TASK_DIR}/{DATA_FILE}` (images relative to it) or point the YAML's `data_files` at it; "
            "then, from this folder:", "",
            "```bash", lmms_eval_command(model_type), "```", "",
            "On a CPU: `device=cpu,device_map=cpu` in `--model_args`. lmms-eval 0.7.3 also needs "
            '`pip install decord "filelock<4"`, and exits 0 even when the evaluation failed: read the '
            "table it prints (or `lmms_eval_out/`)."
            + (" Its `llava_hf` cannot answer an item without an image (it scores 0): keep text-only items "
               "out of the set." if name == "llava_hf" else "")]
