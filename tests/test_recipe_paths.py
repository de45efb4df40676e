"""The downloaded recipe names no server path, and it merges as downloaded when run from where its
header says (a real CLI merge of the bundled family, from the lab's folder)."""

from __future__ import annotations

import yaml

from tests.output_checks import cli
from webapp.presets import TOY_ROOT
from webapp.ui.recipe_paths import LAB_ROOT, portable_ref, portable_yaml

RECIPE = {"vlm": str(TOY_ROOT / "vlm"), "reasoner": str(TOY_ROOT / "math"), "base": str(TOY_ROOT / "base"),
          "method": "linear", "parameters": {"alpha": 0.3}}


def test_each_kind_of_reference(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2-VL-7B-Instruct" / "snapshots" / "a1b2c3"
    assert portable_ref(str(snapshot), None) == ("Qwen/Qwen2-VL-7B-Instruct", None)
    assert portable_ref(str(tmp_path / "root" / "team" / "vlm"), str(tmp_path / "root")) == ("team/vlm", "models root")
    assert portable_ref(str(LAB_ROOT / "assets" / "toy" / "vlm"), None) == ("assets/toy/vlm", "lab")
    assert portable_ref("llava-hf/llava-1.5-7b-hf", None) == ("llava-hf/llava-1.5-7b-hf", None)
    elsewhere = str(tmp_path / "mine" / "vlm")  # typed by the operator, under no root: kept
    assert portable_ref(elsewhere, str(tmp_path / "root")) == (elsewhere, None)


def test_the_models_root_wins_over_the_lab_folder():
    text = portable_yaml(RECIPE, str(TOY_ROOT))
    assert yaml.safe_load(text)["vlm"] == "vlm" and "relative to the app's models root" in text
    assert "merge lab's folder" not in text


def test_the_downloaded_recipe_has_no_server_path_and_merges_from_the_lab_folder(tmp_path):
    text = portable_yaml(RECIPE, None)
    assert str(LAB_ROOT) not in text and "relative to the merge lab's folder" in text
    loaded = yaml.safe_load(text)
    assert (loaded["vlm"], loaded["reasoner"], loaded["base"]) == ("assets/toy/vlm", "assets/toy/math", "assets/toy/base")
    assert loaded["method"] == "linear" and loaded["parameters"] == {"alpha": 0.3}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "merged"
    r = cli("merge", recipe, out, "--no-progress", cwd=LAB_ROOT)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
