"""`python -m merging check RECIPE`: the report, exit codes, one-line reasons, and no writes."""

import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.factories import make_tiny_triple
from tests.output_checks import cli

# ~600 bytes that expand to 9**9 strings if anything expands the aliases
ALIAS_BOMB = "vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 0.1}\nx0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"x{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
    for i in range(1, 9))


def run_check(recipe_path, real=False):
    """In this process; `real` for the one test of a real process's exit code and stderr."""
    return cli("check", recipe_path, real=real)


def write_recipe(path, vlm, reasoner, base, method="task_arithmetic", extra=""):
    path.write_text(f"vlm: {vlm}\nreasoner: {reasoner}\nbase: {base}\nmethod: {method}\n"
                    f"parameters: {{alpha: 0.5}}\n{extra}")
    return path


def snapshot(folder):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*"))


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    good = make_tiny_triple(root / "good")
    deeper = make_tiny_triple(root / "deeper", num_layers=3)
    return root, good, deeper


def test_compatible_triple_reports_and_writes_nothing(triples):
    root, good, _ = triples
    recipe = write_recipe(root / "ok.yaml", good["vlm"], good["reasoner"], good["base"])
    before = snapshot(root)
    r = run_check(recipe)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "family llava, 2 layers, hidden 32, vocab 96" in out
    assert "family llama, 2 layers" in out
    assert "compatible: yes" in out
    assert snapshot(root) == before


def test_different_layer_count_exits_2_with_one_line(triples):
    root, good, deeper = triples
    r = run_check(write_recipe(root / "layers.yaml", good["vlm"], deeper["reasoner"], good["base"]), real=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer counts differ: vlm has 2, reasoner has 3" in lines[0]


def test_different_hidden_size_and_missing_tensor(triples, tmp_path):
    root, good, _ = triples
    from transformers import LlamaForCausalLM

    from tests.factories import llama_config

    LlamaForCausalLM(llama_config(2, hidden_size=48, num_attention_heads=4)).save_pretrained(tmp_path / "wide")
    r = run_check(write_recipe(tmp_path / "wide.yaml", good["vlm"], tmp_path / "wide", good["base"]))
    assert r.returncode == 2 and "hidden sizes differ: vlm 32, reasoner 48" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    holed = tmp_path / "holed"
    holed.mkdir()
    for f in good["reasoner"].iterdir():
        (holed / f.name).write_bytes(f.read_bytes())
    sd = load_file(holed / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, holed / "model.safetensors", metadata={"format": "pt"})
    r = run_check(write_recipe(tmp_path / "holed.yaml", good["vlm"], holed, good["base"]))
    assert r.returncode == 2
    assert "layers.1.mlp.up_proj.weight missing in reasoner" in r.stderr
    assert "missing: layers.1.mlp.up_proj.weight missing in reasoner" in r.stdout


@pytest.mark.parametrize("body, message", [
    ("vlm: a\nreasoner: b\nmethod: warp_drive\n", "unknown method 'warp_drive'"),
    ("vlm: a\nreasoner: b\nbase: c\nmethod: linear\nflavour: mint\n", "unknown recipe key 'flavour'"),
    ("vlm: a\nreasoner: b\nmethod: task_arithmetic\n", "needs 'base'"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 7}\n", "out of range"),
    ("vlm: a\nreasoner: b\nmethod: linear\nlayers: [3, 1]\n", "'layers'"),
    ("vlm: [unclosed\n", "not valid YAML"),
    # hostile or broken YAML: refused while parsing, nothing expanded
    (ALIAS_BOMB, "anchors and aliases"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 0.1, alpha: 0.9}\n", "duplicate key 'alpha'"),
    ("vlm: a\nreasoner: b\nmethod: linear\nmethod: ties\n", "duplicate key 'method' (line 4)"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: " + "[" * 40 + "]" * 40 + "}\n", "nested deeper"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: " + "[" * 40000 + "]" * 40000 + "}\n",
     "the limit is 64 KB"),
    (b"vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 0.1}\n# caf\xe9\n", "not UTF-8 text"),
    (b"vlm: a\x00\nreasoner: b\nmethod: linear\n", "character #x0000 at position 6 is not allowed"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 1" + "0" * 400 + "}\n", "must be a finite number"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 1.0e+400}\n", "must be a finite number, got inf"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 10**400}\n", "must be a finite number"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: 1" + "0" * 5000 + "}\n", "too many digits"),
    ("vlm: a\nreasoner: b\nmethod: linear\nparameters: {alpha: [" + ", ".join(["0.1"] * 2000) + "]}\n",
     "at most 1024"),
    ("vlm: a\nreasoner: b\nmethod: linear\nseed: " + str(2**64) + "\n", "'seed' must be a whole number"),
])
def test_bad_recipes_are_rejected_before_any_work(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    t0 = time.monotonic()
    r = run_check(p)
    assert time.monotonic() - t0 < 60  # the alias bomb used to hang here
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_malformed_safetensors_header_is_one_line(triples, tmp_path):
    root, good, _ = triples
    bad = tmp_path / "bad"
    shutil.copytree(good["reasoner"], bad)
    header = b'{"model.norm.weight": {"dtype": "F32", "shape": [-8], "data_offsets": [0, 32]}}'
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    r = run_check(write_recipe(tmp_path / "r.yaml", good["vlm"], bad, good["base"]))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad header entry (shape" in lines[0], r.stderr


def test_missing_model_folder_is_named(triples, tmp_path):
    _, good, _ = triples
    r = run_check(write_recipe(tmp_path / "gone.yaml", good["vlm"], tmp_path / "nowhere", good["base"]))
    assert r.returncode == 2 and f"reasoner: model folder not found: {tmp_path / 'nowhere'}" in r.stderr
    r = run_check(tmp_path / "no-such-recipe.yaml")
    assert r.returncode == 2 and "recipe file not found" in r.stderr


def test_a_base_that_is_not_the_parent_is_warned_about(triples, tmp_path):
    root, good, _ = triples
    stranger = make_tiny_triple(tmp_path / "stranger", seed=7)  # an unrelated random base
    r = run_check(write_recipe(tmp_path / "stranger.yaml", good["vlm"], good["reasoner"], stranger["base"]))
    assert r.returncode == 0
    assert "warning: the reasoner's task vector is implausibly large" in r.stdout
    assert "warning: the vlm's task vector is implausibly large" in r.stdout
    r = run_check(write_recipe(tmp_path / "fine.yaml", good["vlm"], good["reasoner"], good["base"]))
    assert "implausibly large" not in r.stdout


def _probe_distance(a: Path, b: Path, names: list[str]) -> float:
    """Independent of merging.compat: the tensors straight from the safetensors files."""
    ta = {**load_file(a / "model.safetensors")}
    tb = {**load_file(b / "model.safetensors")}
    return max(float((ta[na].float() - tb[nb].float()).norm() / tb[nb].float().norm()) for na, nb in names)


def test_a_reasoner_from_another_base_is_warned_with_its_distance(triples, tmp_path, capsys):
    from merging.__main__ import main

    root, good, _ = triples
    stranger = make_tiny_triple(tmp_path / "stranger", seed=7)
    # No base in a linear recipe: only the reasoner-vs-VLM probe can tell.
    recipe = tmp_path / "far.yaml"
    recipe.write_text(f"vlm: {good['vlm']}\nreasoner: {stranger['reasoner']}\nmethod: linear\nparameters: {{alpha: 0.5}}\n")
    assert main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    names = [("language_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
             ("language_model.model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight")]
    far = _probe_distance(stranger["reasoner"], good["vlm"], [(b, a) for a, b in names])
    assert far > 0.9  # two random inits of the same scale are about sqrt(2) apart
    assert float(re.search(r"reasoner vs vlm ([0-9.]+)", out)[1]) == pytest.approx(far, abs=2e-3)
    warned = re.search(r"warning: the reasoner is far from the VLM's language model \(\|\|W_r - W_vlm\|\| / \|\|W_vlm\|\| = ([0-9.]+)", out)
    assert warned and float(warned[1]) == pytest.approx(far, abs=2e-2)
    recipe.write_text(f"vlm: {good['vlm']}\nreasoner: {good['reasoner']}\nmethod: linear\nparameters: {{alpha: 0.5}}\n")
    assert main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    near = _probe_distance(good["reasoner"], good["vlm"], [(b, a) for a, b in names])
    assert near < 0.5 and "far from the VLM" not in out
    assert float(re.search(r"reasoner vs vlm ([0-9.]+)", out)[1]) == pytest.approx(near, abs=2e-3)


def test_the_apps_report_shows_the_distance_and_the_warning_before_a_merge(triples, tmp_path):
    from merging.compat import check_triple
    from webapp.ui.models_panel import report_markdown

    root, good, _ = triples
    stranger = make_tiny_triple(tmp_path / "stranger", seed=7)
    md = report_markdown(check_triple(str(good["vlm"]), str(stranger["reasoner"]), str(good["base"])), "")
    assert "Compatible: ready to merge" in md
    assert re.search(r"reasoner vs vlm [0-9.]+ · vlm vs base [0-9.]+ · reasoner vs base [0-9.]+", md)
    assert "- **Warning:** the reasoner is far from the VLM's language model" in md
    assert "- **Warning:** the reasoner's task vector is implausibly large" in md
    md = report_markdown(check_triple(str(good["vlm"]), str(good["reasoner"]), str(good["base"])), "")
    assert "Warning" not in md


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_a_non_float_weight_in_a_merged_place_is_refused(triples, tmp_path, dtype):
    import shutil

    root, good, _ = triples
    bad = tmp_path / "reasoner"
    shutil.copytree(good["reasoner"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = (tensors[name] > 0).to(dtype)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    r = run_check(write_recipe(tmp_path / "r.yaml", good["vlm"], bad, good["base"]))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: reasoner: language-model tensor {name} is {str(dtype)[6:]}, not floating point; "
                                "the lab merges only float weights")
