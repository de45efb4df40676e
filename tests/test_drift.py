"""DRIFT: the three gradient rewrites, the prior, alpha 0 == plain fine-tuning, and no silent skips."""

import dataclasses
import os
import pickle
import subprocess
import sys

import pytest
import torch

from merging.checkpoint import Checkpoint
from merging.drift import DriftResult, adjust_gradient, attach_hooks, compute_prior, drift_settings
from merging.errors import LabError
from tests.factories import make_tiny_triple
from tests.paths import ROOT, TOY


def test_each_mode_matches_its_formula():
    g, d = torch.tensor([3.0, 4.0]), torch.tensor([2.0, 0.0])  # |g| = 5, d/|d| = (1, 0), cos = 0.6
    a = 0.5
    assert torch.allclose(adjust_gradient(g, d, "absolute", a), torch.tensor([3.0 - 0.5 * 2.0, 4.0]))
    assert torch.allclose(adjust_gradient(g, d, "gradnorm", a), torch.tensor([3.0 - 0.5 * 5.0, 4.0]))
    assert torch.allclose(adjust_gradient(g, d, "adaptive_cosine", a), torch.tensor([3.0 - 0.5 * 0.8 * 5.0, 4.0]))
    # Opposite directions: cos = -1, so adaptive_cosine leaves the gradient alone.
    assert torch.equal(adjust_gradient(torch.tensor([-1.0, 0.0]), d, "adaptive_cosine", 1.0), torch.tensor([-1.0, 0.0]))
    with pytest.raises(LabError, match="unknown DRIFT mode"):
        adjust_gradient(g, d, "sideways", a)


def expected_gradient(g, d, w, mode, a, normalize=True):
    """The DRIFT rewrite written out from the paper and the reference code (not adjust_gradient)."""
    if mode == "absolute":
        return g - a * (d * w.norm() / d.norm() if normalize else d)
    unit = d / d.norm()
    cos = float((g * d).sum() / (g.norm() * d.norm()))
    scale = 1.0 if mode == "gradnorm" else (cos + 1) / 2
    return g - a * scale * g.norm() * unit


@pytest.mark.parametrize("mode,normalize", [("absolute", True), ("absolute", False), ("gradnorm", True),
                                            ("adaptive_cosine", True)])
def test_hooks_rewrite_real_gradients(tmp_path, mode, normalize):
    from transformers import LlavaForConditionalGeneration

    tri = make_tiny_triple(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tri["vlm"])
    prior = compute_prior(str(tri["vlm"]), str(tri["reasoner"]))
    name = "layers.1.mlp.down_proj.weight"
    param = model.model.language_model.layers[1].mlp.down_proj.weight
    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    plain = param.grad.clone()
    model.zero_grad()
    handles = attach_hooks(model, prior, mode, alpha=0.7, normalize_delta=normalize)
    assert len(handles) == len(prior) == 2 * 7  # every projection of both layers, none skipped
    model(input_ids=ids, labels=ids).loss.backward()
    want = expected_gradient(plain, prior[name], param.detach(), mode, 0.7, normalize)
    assert torch.allclose(param.grad, want, atol=1e-6)
    assert not torch.allclose(param.grad, plain)


@pytest.mark.parametrize("mode", ["absolute", "gradnorm", "adaptive_cosine"])
def test_one_drift_step_moves_the_weights_toward_the_reasoner(tmp_path, mode):
    """alpha large against the task gradient: one SGD step shrinks the distance to the reasoner's weights."""
    from transformers import LlavaForConditionalGeneration

    tri = make_tiny_triple(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tri["vlm"])
    prior = compute_prior(str(tri["vlm"]), str(tri["reasoner"]))
    with Checkpoint.open(tri["reasoner"]) as r:
        target = r.get("model.layers.1.mlp.down_proj.weight")
    param = model.model.language_model.layers[1].mlp.down_proj.weight
    before = float((param.detach() - target).norm())
    attach_hooks(model, prior, mode, alpha=5.0)
    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        param -= 1e-3 * param.grad
    assert float((param.detach() - target).norm()) < before


def test_prior_is_reasoner_minus_vlm_for_projections_only(tmp_path):
    tri = make_tiny_triple(tmp_path)
    prior = compute_prior(str(tri["vlm"]), str(tri["reasoner"]))
    assert all(("self_attn" in c or "mlp" in c) for c in prior)
    assert "norm.weight" not in prior and "embed_tokens.weight" not in prior
    with Checkpoint.open(tri["vlm"]) as v, Checkpoint.open(tri["reasoner"]) as r:
        c = "layers.0.self_attn.q_proj.weight"
        want = r.get("model.layers.0.self_attn.q_proj.weight") - v.get("language_model.model.layers.0.self_attn.q_proj.weight")
        assert torch.equal(prior[c], want)


def test_mismatched_prior_names_raise_never_skip(tmp_path):
    from transformers import LlavaForConditionalGeneration

    tri = make_tiny_triple(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tri["vlm"])
    with pytest.raises(LabError, match="layers.9.self_attn.q_proj.weight"):
        attach_hooks(model, {"layers.9.self_attn.q_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(LabError, match="not an attention/MLP projection"):
        attach_hooks(model, {"vision_tower.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(LabError, match="layers.0.mlp.up_proj.weight"):  # right name, wrong shape
        attach_hooks(model, {"layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})


def test_settings_are_validated():
    assert drift_settings({"alpha": 0})["mode"] == "adaptive_cosine"
    with pytest.raises(LabError, match="unknown drift setting 'speed'"):
        drift_settings({"speed": 3})
    with pytest.raises(LabError, match="drift lr"):
        drift_settings({"lr": -1})
    assert drift_settings({})["normalize_delta"] is True  # the reference's default
    with pytest.raises(LabError, match="normalize_delta must be true or false"):
        drift_settings({"normalize_delta": "yes"})


@pytest.mark.skipif(not (TOY / "vlm" / "config.json").exists(), reason="toy family not built")
def test_alpha_zero_is_plain_finetuning_step_for_step():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from merging.finetune import finetune
    from tasks.drift_data import training_examples

    examples = training_examples(8, seed=0)
    prior = compute_prior(str(TOY / "vlm"), str(TOY / "math"))
    runs = []
    for use_prior, alpha in ((False, 0.0), (True, 0.0), (True, 1.0)):
        model = AutoModelForImageTextToText.from_pretrained(TOY / "vlm", dtype=torch.float32)
        proc = AutoProcessor.from_pretrained(TOY / "vlm")
        losses = finetune(model, proc, examples, steps=3, lr=1e-3, batch_size=4, seed=0,
                          prior=prior if use_prior else None, alpha=alpha)
        runs.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (l_plain, sd_plain), (l_zero, sd_zero), (_, sd_drift) = runs
    assert l_plain == l_zero
    assert all(torch.equal(sd_plain[k], sd_zero[k]) for k in sd_plain)
    changed = [k for k in sd_plain if not torch.equal(sd_plain[k], sd_drift[k])]
    assert changed and all("language_model" in k or "lm_head" in k for k in changed)
    assert not [k for k in sd_plain if ("vision_tower" in k or "projector" in k) and k in changed]


@pytest.mark.skipif(not (TOY / "vlm" / "config.json").exists(), reason="toy family not built")
def test_drift_command_writes_a_loadable_folder(tmp_path):
    recipe = tmp_path / "drift.yaml"
    recipe.write_text(f"vlm: {TOY / 'vlm'}\nreasoner: {TOY / 'math'}\n"
                      "drift: {steps: 2, examples: 8, batch_size: 4, lr: 0.001}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "merging", "drift", str(recipe), str(tmp_path / "out"), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    recipe.write_text(f"vlm: {TOY / 'vlm'}\nreasoner: {TOY / 'math'}\ndrift: {{mode: sideways}}\n")
    r = subprocess.run([sys.executable, "-m", "merging", "drift", str(recipe), str(tmp_path / "out2")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "drift mode must be one of" in r.stderr and not (tmp_path / "out2").exists()


@pytest.mark.skipif(not (TOY / "vlm" / "config.json").exists(), reason="toy family not built")
def test_run_drift_returns_its_result(tmp_path):
    from merging.finetune import run_drift

    settings = drift_settings({"steps": 2, "examples": 8, "batch_size": 4, "lr": 1e-3})
    spec = {"vlm": str(TOY / "vlm"), "reasoner": str(TOY / "math"), "drift": settings}
    result = run_drift(spec, tmp_path / "out")
    assert isinstance(result, DriftResult) and result.folder == str(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert (result.vlm, result.reasoner, result.settings) == (spec["vlm"], spec["reasoner"], settings)
    assert result.steps == 2 and result.final_loss == result.losses[-1] and result.seconds > 0 and not result.reused
    assert pickle.loads(pickle.dumps(result)) == result  # it crosses the worker's pipe
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.folder = "elsewhere"
