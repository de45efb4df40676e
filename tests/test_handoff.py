"""What a merged folder hands on: the model card's Hugging Face front matter and mergekit block, and
an lmms-eval task that scores a lab-format JSONL set exactly as `python -m analysis eval` does
(checked on the hooks in-process, and end to end through lmms-eval itself where it is installed)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from analysis.eval_file import read_items
from analysis.evaluate import MAX_NEW_TOKENS, evaluate
from merging import handoff, layout
from merging import recipe as recipe_mod
from merging.checkpoint import Checkpoint
from merging.engine import merge_to_disk
from tasks.toydata import parse_answer
from tests.paths import TOY
from webapp.ui.export_zip import zip_for_download

# The Python that has lmms-eval: LMMS_EVAL_PYTHON (its own venv: it pins packages the lab does
# not), else this one. LAB_REQUIRE_LMMS_EVAL=1 (CI) turns its absence into a failure.
EVAL_PYTHON = os.environ.get("LMMS_EVAL_PYTHON") or sys.executable
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def merge(tmp_path: Path, method: str, parameters: dict, name: str = "merged", **extra) -> Path:
    rec = recipe_mod.from_dict({"vlm": str(TOY / "vlm"), "reasoner": str(TOY / "math"), "base": str(TOY / "base"),
                                "method": method, "parameters": parameters, **extra})
    return merge_to_disk(rec, tmp_path / name, bar=False)


def card_parts(folder: Path) -> tuple[dict, dict | None, str]:
    """(front matter, the mergekit YAML block or None, the mergekit section's text) of a model card."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    section = text.split("## mergekit\n", 1)[1].split("\n## ", 1)[0]
    block = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0]) if "```yaml" in section else None
    return meta, block, section


def lm_tensor(ref: Path, canonical: str):
    with Checkpoint.open(str(ref)) as ck:
        return ck.get(layout.derive_layout(ck).lm[canonical]).float()


def test_task_arithmetic_card_front_matter_and_mergekit_block_reproduce_the_merge(tmp_path):
    out = merge(tmp_path, "task_arithmetic", {"alpha": 0.7})
    meta, block, _ = card_parts(out)
    assert meta["base_model"] == [str(TOY / "vlm"), str(TOY / "math")]
    assert meta["library_name"] == "transformers" and meta["tags"] == ["merge", "task_arithmetic"]
    assert block["merge_method"] == "task_arithmetic" and block["base_model"] == str(TOY / "base")
    assert [(m["model"], m["parameters"]["weight"]) for m in block["models"]] == [(str(TOY / "vlm"), 1.0),
                                                                                 (str(TOY / "math"), 0.7)]
    assert block["parameters"] == {"normalize": False}
    # mergekit's task arithmetic read off the block: base + sum of weight * (model - base)
    name = "layers.3.mlp.up_proj.weight"
    base = lm_tensor(TOY / "base", name)
    expected = base + sum(m["parameters"]["weight"] * (lm_tensor(Path(m["model"]), name) - base) for m in block["models"])
    assert (lm_tensor(out, name) - expected).abs().max() < 1e-6


def test_ties_card_carries_weights_density_normalize_and_lambda(tmp_path):
    out = merge(tmp_path, "ties", {"alpha": [0.4, 0.8], "density": 0.3, "weight_vlm": 0.9, "lam": 1.2})
    meta, block, _ = card_parts(out)
    assert meta["tags"] == ["merge", "ties"] and meta["base_model"] == [str(TOY / "vlm"), str(TOY / "math")]
    assert block["merge_method"] == "ties" and block["base_model"] == str(TOY / "base")
    vlm, reasoner = block["models"]
    assert vlm == {"model": str(TOY / "vlm"), "parameters": {"weight": 0.9, "density": 0.3}}
    assert reasoner == {"model": str(TOY / "math"), "parameters": {"weight": [0.4, 0.8], "density": 0.3}}
    assert block["parameters"] == {"normalize": True, "lambda": 1.2} and block["dtype"] == "float32"


def test_methods_mergekit_lacks_say_so(tmp_path):
    for method, knobs in (("layer_swap", {}), ("ties", {"br2v": 1})):
        meta, block, section = card_parts(merge(tmp_path, method, knobs, name=f"{method}-{len(knobs)}"))
        assert meta["tags"] == ["merge", method] and block is None
        assert "No mergekit equivalent" in section
    assert "has no mergekit merge method" in card_parts(tmp_path / "layer_swap-0")[2]


def test_merge_writes_the_lmms_eval_task(tmp_path):
    out = merge(tmp_path, "task_arithmetic", {"alpha": 0.5})
    assert (out / handoff.TASK_DIR / handoff.TASK_YAML).read_text() == handoff.task_yaml()
    assert (out / handoff.TASK_DIR / handoff.UTILS).read_text() == handoff.utils_py()


def test_dare_and_linear_blocks():
    rec = recipe_mod.from_dict({"vlm": "v", "reasoner": "r", "base": "b", "method": "dare_linear"})
    block = handoff.mergekit_config(rec, rec.knobs())
    assert block["parameters"] == {"normalize": False, "lambda": 1.0, "rescale": True}
    # mergekit's `rescale` is the L1 one: off is `rescale: false`; the paper's 1/density has no block
    for name, want in (("none", False), (2, False)):
        rec = recipe_mod.from_dict({"vlm": "v", "reasoner": "r", "base": "b", "method": "dare_ties",
                                    "parameters": {"rescale": name}})
        assert handoff.mergekit_config(rec, rec.knobs())["parameters"]["rescale"] is want
    rec = recipe_mod.from_dict({"vlm": "v", "reasoner": "r", "base": "b", "method": "dare_ties",
                                "parameters": {"rescale": "inverse_density"}})
    assert rec.parameters == {"rescale": 1} and handoff.mergekit_config(rec, rec.knobs()) is None
    assert "rescale: inverse_density" in "\n".join(handoff.mergekit_section(rec, rec.knobs()))
    rec = recipe_mod.from_dict({"vlm": "v", "reasoner": "r", "method": "linear", "parameters": {"alpha": 0.25}})
    block = handoff.mergekit_config(rec, rec.knobs())
    assert block == {"merge_method": "linear", "models": [{"model": "v", "parameters": {"weight": 0.75}},
                                                          {"model": "r", "parameters": {"weight": 0.25}}],
                     "dtype": "float32"}


def eval_set(root: Path, n_image: int = 5, n_perception: int = 3) -> Path:
    """A lab-format JSONL set from the bundled suites' first items, its images copied beside it."""
    (root / "images").mkdir(parents=True)
    lines = []
    for suite, n in (("visual_math", n_image), ("perception", n_perception)):
        for line in (TOY / "eval" / f"{suite}.jsonl").read_text().splitlines()[:n]:
            item = json.loads(line)
            shutil.copy(TOY / "eval" / item["image"], root / item["image"])
            lines.append(json.dumps({k: item[k] for k in ("id", "question", "answer", "image")}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    return root / "items.jsonl"


class _TaskLoader(yaml.SafeLoader):
    """lmms-eval's YAML: !function names a hook in the task folder."""


_TaskLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def load_hooks(task_dir: Path):
    spec = importlib.util.spec_from_file_location("merge_lab_utils_under_test", task_dir / handoff.UTILS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_merge(tmp_path_factory):
    """A task_arithmetic merge of the bundled family, an 8-item set, and the lab's own scores of it."""
    root = tmp_path_factory.mktemp("handoff")
    folder = merge(root, "task_arithmetic", {"alpha": 0.5})
    items = eval_set(root / "set")
    lab = evaluate(str(folder), suites=[], extra={"custom": read_items(items)}, return_items=True)
    return folder, items, lab


def test_task_yaml_and_hooks_score_real_generations_as_analysis_eval(toy_merge, tmp_path):
    folder, items, lab = toy_merge
    task_dir = handoff.write_lmms_eval_task(tmp_path / "m", str(items))
    cfg = yaml.load((task_dir / handoff.TASK_YAML).read_text(), Loader=_TaskLoader)
    assert cfg["task"] == handoff.TASK_NAME and cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(items) and cfg["test_split"] == "test"
    assert cfg["generation_kwargs"] == {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "do_sample": False, "until": []}
    assert cfg["process_results"] == "!function merge_lab_utils.process_results"
    assert cfg["metric_list"] == [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    hooks = load_hooks(task_dir)
    docs = [json.loads(line) for line in items.read_text().splitlines()]
    records = lab["items"]["custom"]
    assert len(records) == len(docs) == 8 and {r["correct"] for r in records} == {True, False}
    for doc, rec, item in zip(docs, records, read_items(items)):
        assert hooks.doc_to_text(doc) == item["question"]
        (image,) = hooks.doc_to_visual(doc)
        assert image.tobytes() == item["pil"].tobytes()
        assert hooks.process_results(doc, [rec["output"]]) == {"exact_match": float(rec["correct"])}


def test_hooks_answer_rule_is_the_labs(tmp_path):
    task_dir = handoff.write_lmms_eval_task(tmp_path / "m")
    hooks = load_hooks(task_dir)
    doc = {"question": " q ", "answer": " Seven "}
    for text in ("the answer is seven .", "The Answer is SEVEN", "the answer is  7", "no answer here",
                 "the answer is seven . the answer is 8", "the answer isseven", ""):
        assert hooks.process_results(doc, [text])["exact_match"] == float(parse_answer(text) == "seven")
    assert hooks.doc_to_visual({"image": None}) == [] and hooks.doc_to_text(doc) == "q"


def test_hooks_read_images_relative_to_the_jsonl_and_never_outside(tmp_path):
    task_dir = handoff.write_lmms_eval_task(tmp_path / "m")  # the default set: items.jsonl beside the YAML
    Image.new("RGB", (4, 4), (1, 2, 3)).save(task_dir / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "m" / "outside.png")
    hooks = load_hooks(task_dir)
    assert hooks.doc_to_visual({"image": "a.png"})[0].getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="outside"):
        hooks.doc_to_visual({"image": "../outside.png"})


def test_export_zip_carries_the_task_and_keeps_the_folder_own(toy_merge, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(toy_merge[0], folder, ignore=shutil.ignore_patterns(handoff.TASK_DIR))
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    archive, why = zip_for_download(folder)
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert z.read(f"export/{handoff.TASK_DIR}/{handoff.TASK_YAML}").decode() == handoff.task_yaml()
        assert z.read(f"export/{handoff.TASK_DIR}/{handoff.UTILS}").decode() == handoff.utils_py()
    assert why == "" and "export/README.md" in names and len(names) == len(set(names))
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    handoff.write_lmms_eval_task(folder, "/data/my.jsonl")  # the folder's own task wins
    with zipfile.ZipFile(zip_for_download(folder)[0]) as z:
        names = z.namelist()
        assert "/data/my.jsonl" in z.read(f"export/{handoff.TASK_DIR}/{handoff.TASK_YAML}").decode()
    assert len(names) == len(set(names))


def test_every_family_gets_a_model_type_and_a_runnable_command():
    for family in layout.FAMILIES:
        cmd = shlex.split(handoff.lmms_eval_command(family, "/m", "cpu"))
        assert cmd[:4] == ["python", "-m", "lmms_eval", "--model"] and cmd[4] == handoff.lmms_eval_model(family)
        assert "pretrained=/m,device=cpu,device_map=cpu" in cmd and handoff.TASK_NAME in cmd
    assert handoff.lmms_eval_model("llava") == "llava_hf" and handoff.lmms_eval_model("qwen2_vl") == "qwen2_vl"
    assert handoff.lmms_eval_model("idefics3") == handoff.FALLBACK_MODEL


def lmms_eval_or_skip() -> str:
    probe = subprocess.run([EVAL_PYTHON, "-c", "import importlib.util as u; print(bool(u.find_spec('lmms_eval')))"],
                           capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() != "True":
        why = f"lmms-eval is not installed for {EVAL_PYTHON} (set LMMS_EVAL_PYTHON; README: Benchmark with lmms-eval)"
        if os.environ.get("LAB_REQUIRE_LMMS_EVAL") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return EVAL_PYTHON


@pytest.mark.slow
def test_lmms_eval_registry_has_every_model_the_lab_names():
    python = lmms_eval_or_skip()
    code = ("import json; from lmms_eval.models import AVAILABLE_SIMPLE_MODELS as s, "
            "AVAILABLE_CHAT_TEMPLATE_MODELS as c; print(json.dumps(sorted(set(s) | set(c))))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    registered = set(json.loads(r.stdout.strip().splitlines()[-1]))
    named = {handoff.lmms_eval_model(f) for f in layout.FAMILIES} | {handoff.FALLBACK_MODEL}
    assert named <= registered, named - registered


@pytest.mark.slow
def test_lmms_eval_scores_the_merge_as_analysis_eval(toy_merge, tmp_path):
    python = lmms_eval_or_skip()
    folder, items, lab = toy_merge
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    handoff.write_lmms_eval_task(run, str(items))
    cmd = shlex.split(handoff.lmms_eval_command("llava", str(run), "cpu"))
    cmd[0] = python  # lmms-eval exits 0 even when the evaluation failed: the results file is the verdict
    r = subprocess.run(cmd + ["--log_samples"], cwd=run, env={**os.environ, **OFFLINE}, capture_output=True,
                       text=True, timeout=600)
    results = glob.glob(str(run / "lmms_eval_out" / "**" / "*_results.json"), recursive=True)
    assert r.returncode == 0 and len(results) == 1, (r.stdout + r.stderr)[-3000:]
    score = json.loads(Path(results[0]).read_text())["results"][handoff.TASK_NAME]["exact_match,none"]
    assert score == pytest.approx(lab["accuracy"]["custom"])
    (samples,) = glob.glob(str(run / "lmms_eval_out" / "**" / "*_samples_*.jsonl"), recursive=True)
    got = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    assert [s["filtered_resps"] for s in sorted(got, key=lambda s: s["doc_id"])] == \
        [rec["output"] for rec in lab["items"]["custom"]]
