"""DRIFT's `layers: [a, b]` option: only those decoder layers train (every other tensor keeps the VLM's
bits), what it holds counts only them, and bad ranges are refused before anything is written."""

from __future__ import annotations

import glob
import math
import re

import pytest
import torch
from safetensors import safe_open

from merging.drift import drift_settings
from merging.drift_memory import drift_bytes
from merging.errors import LabError
from merging.finetune import run_drift
from tests.paths import TOY

IN_2_3 = re.compile(r"^language_model\.model\.layers\.[23]\.")


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in glob.glob(str(folder / "*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[k] = sf.get_tensor(k)
    return out


def test_only_the_chosen_layers_train(tmp_path):
    settings = drift_settings({"steps": 2, "examples": 8, "batch_size": 4, "lr": 1e-3, "layers": [2, 3]})
    run_drift({"vlm": str(TOY / "vlm"), "reasoner": str(TOY / "math"), "drift": settings}, tmp_path / "out")
    before, after = _tensors(TOY / "vlm"), _tensors(tmp_path / "out")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert changed and all(IN_2_3.search(k) for k in changed), sorted(changed - {k for k in changed if IN_2_3.search(k)})
    assert any(".self_attn.q_proj." in k for k in changed) and any(".mlp." in k for k in changed)


def test_what_it_holds_counts_the_chosen_layers_only():
    sizes = {}
    for f in glob.glob(str(TOY / "vlm" / "*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                sizes[k] = math.prod(sf.get_slice(k).get_shape())
    proj = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)$")
    layer_n = sum(n for k, n in sizes.items() if IN_2_3.search(k))
    proj_n = sum(n for k, n in sizes.items() if IN_2_3.search(k) and proj.search(k))
    b = drift_bytes(str(TOY / "vlm"), str(TOY / "math"), [2, 3])
    assert (b.model, b.training, b.prior) == (4 * sum(sizes.values()), 12 * layer_n, 4 * proj_n)
    assert b.training < drift_bytes(str(TOY / "vlm"), str(TOY / "math")).training


@pytest.mark.parametrize("bad", [[3, 2], [-1, 2], [1], "2-3", [1.5, 2], [True, 2]])
def test_a_malformed_range_is_refused(bad):
    with pytest.raises(LabError, match=r"^drift layers must be \[first, last\] decoder layers"):
        drift_settings({"layers": bad})


def test_a_range_past_the_model_is_refused_and_writes_nothing(tmp_path):
    settings = drift_settings({"steps": 1, "examples": 4, "batch_size": 2, "layers": [6, 8]})
    with pytest.raises(LabError, match=r"^drift layers \[6, 8\] is out of range: the model has 8 decoder layers"):
        run_drift({"vlm": str(TOY / "vlm"), "reasoner": str(TOY / "math"), "drift": settings}, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_a_recipe_without_layers_names_the_same_run_as_before():
    """The option is not among the defaults: an existing run's settings (and so its key) are unchanged."""
    assert "layers" not in drift_settings({"steps": 3})
