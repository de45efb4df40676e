"""DRIFT: the three gradient rewrites, the prior, alpha 0 == plain fine-tuning, and no silent skips; its
training data (a JSONL, or the toy scenes for the bundled family only) and its run key (the loss mask: test_loss_mask.py)."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

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


# ------------------------------------------------------------------ training data (drift: data:)
needs_toy = pytest.mark.skipif(not (TOY / "vlm" / "config.json").exists(), reason="toy family not built")
# Four items the toy VLM has never answered this way (its answers are about shapes and sums): a
# falling loss and the answers coming back word for word can only come from training on this file.
MEMO = [("how many circles ?", "lily has 3 cats ."), ("what color is the shape ?", "tom has 5 pens ."),
        ("how many squares ?", "mia gets 2 books ."), ("describe the image .", "ben has 7 cars .")]


@pytest.fixture
def one_thread():
    """A 1.8 M-parameter model trains faster on one thread than on two that share busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_set(folder, rows, name="train.jsonl", image_ext="png"):
    """A JSONL in the eval upload's format with its images under folder/images; returns its path.
    rows: a line as it is, (question, answer) with a toy image, or (question, answer, _) without one."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            lines.append(row)
            continue
        q, a, *text_only = row
        if text_only:
            lines.append(json.dumps({"question": q, "answer": a}))
            continue
        src = TOY / "eval" / "images" / f"perception_{i % 10:04d}.png"
        Image.open(src).convert("RGB").save(folder / "images" / f"{i}.{image_ext}")
        lines.append(json.dumps({"question": q, "answer": a, "image": f"images/{i}.{image_ext}"}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(folder, data: str | None, vlm=None, **drift):
    settings = {"steps": 2, "batch_size": 4, "examples": 4, "lr": 1e-3, **drift}
    if data is not None:
        settings["data"] = data
    body = {"vlm": str(vlm or TOY / "vlm"), "reasoner": str(TOY / "math"), "drift": settings}
    path = folder / "drift.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


@needs_toy
def test_a_recipe_with_data_trains_on_it(tmp_path, monkeypatch, one_thread):
    """data: relative to the recipe's folder (not the working one); loss falls on a set small enough
    to memorise (measured: 5.63 -> 0.08 in 30 steps), and the model then answers it word for word."""
    from analysis.evaluate import generate, load_model
    from merging.finetune import load_drift_recipe, run_drift, training_data

    recipes = tmp_path / "recipes"
    write_set(recipes / "data", MEMO + [("how many ?", "sam has 1 box .")] * 2)
    recipe = write_recipe(recipes, "data/train.jsonl", steps=30, lr=3e-3, alpha=1.0)
    monkeypatch.chdir(tmp_path)  # data/train.jsonl is not here: only the recipe's folder has it
    spec = load_drift_recipe(recipe)
    assert spec["drift"]["data"] == str(recipes / "data" / "train.jsonl")
    data = training_data(spec)
    assert len(data.examples) == 4 and data.source.startswith("4 of the 6 items")  # examples caps
    result = run_drift(spec, tmp_path / "out", data=data)
    first, last = result.losses[0], result.final_loss
    print(f"memorise 4 items: loss {first:.3f} -> {last:.3f} in {result.steps} steps")
    assert first > 3.0 and last < 0.25 and last < first / 15
    assert "4 of the 6 items" in (tmp_path / "out" / "README.md").read_text()
    model, proc = load_model(tmp_path / "out")
    images = [Image.open(recipes / "data" / "images" / f"{i}.png").convert("RGB") for i in range(4)]
    assert generate(model, proc, [q for q, _ in MEMO], images) == [a for _, a in MEMO]


@needs_toy
def test_refusals_name_the_file_and_line_before_anything_loads(tmp_path):
    from merging.finetune import load_drift_recipe, run_drift

    def refusal(data, vlm=None):
        with pytest.raises(LabError) as e:
            run_drift(load_drift_recipe(write_recipe(tmp_path, data, vlm)), tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return str(e.value)

    assert refusal("nothing.jsonl") == f"{tmp_path / 'nothing.jsonl'}: no such file"
    write_set(tmp_path, [MEMO[0], '{"question": "how many ?"}'], "bad.jsonl")
    assert refusal("bad.jsonl") == f'{tmp_path / "bad.jsonl"} line 2: "answer" is missing'
    (tmp_path / "sub").mkdir()
    write_set(tmp_path / "sub", [MEMO[0]], "up.jsonl")
    (tmp_path / "sub" / "up.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "../images/0.png"}))
    assert refusal("sub/up.jsonl").endswith('line 1: "image" \'../images/0.png\' goes up out of the JSONL\'s folder (..)')
    (tmp_path / "sub" / "link.png").symlink_to(tmp_path / "images" / "0.png")
    (tmp_path / "sub" / "up.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "link.png"}))
    assert "is a link that leads out of the JSONL's folder" in refusal("sub/up.jsonl")
    with pytest.raises(LabError, match="drift data must be the path of a .jsonl file"):
        drift_settings({"data": 3})


def test_a_vlm_other_than_the_bundled_family_needs_data(tmp_path):
    from merging.finetune import is_toy_family, run_drift

    tri = make_tiny_triple(tmp_path)
    spec = {"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "drift": drift_settings({"steps": 1})}
    with pytest.raises(LabError) as e:
        run_drift(spec, tmp_path / "out")
    assert str(e.value).startswith(f"DRIFT on {tri['vlm']} needs training data: give a JSONL of image + question")
    assert not (tmp_path / "out").exists() and not is_toy_family(tri["vlm"])
    if (TOY / "vlm" / "config.json").exists():
        assert is_toy_family(TOY / "vlm") and not is_toy_family(TOY / "math")


@needs_toy
def test_the_run_key_follows_the_content_not_the_path(tmp_path):
    """One byte of one image changed: another run (the app retrains); the same files elsewhere (a re-upload):
    the same run (the app reuses the folder)."""
    from merging.finetune import run_identity, training_data
    from webapp.protocol import recipe_key

    def key(path):
        spec = {"vlm": str(TOY / "vlm"), "reasoner": str(TOY / "math"),
                "drift": drift_settings({"data": str(path), "examples": 2})}
        return recipe_key(run_identity(spec, training_data(spec)))

    # BMP, uncompressed: any pixel byte may change; the first item has no image
    path = write_set(tmp_path / "a", [("what is 2 + 3 ?", "5", "text only"), *MEMO], image_ext="bmp")
    before = key(path)
    image = tmp_path / "a" / "images" / "3.bmp"  # past the examples cap: still part of the data's hash
    raw = bytearray(image.read_bytes())
    raw[-5] ^= 1
    image.write_bytes(bytes(raw))
    changed = key(path)
    assert changed != before
    raw[-5] ^= 1
    image.write_bytes(bytes(raw))
    assert key(path) == before
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert key(tmp_path / "b" / "train.jsonl") == before
    path.write_text(path.read_text().replace("lily", "mia"))
    assert key(path) != before


def test_replay_mixes_perception_questions_into_the_toy_scenes():
    """replay r: round(n r) of the n toy examples are perception questions of the suite's four kinds, spread
    through the list; the visual-math ones are those of the run without replay, in order; a data file
    refuses replay (its items are the user's to mix)."""
    from tasks import toydata as td
    from tasks.drift_data import training_examples

    plain = [q for _, q, _ in training_examples(40, seed=3)]
    mixed = training_examples(40, seed=3, replay=0.25)
    asked = {td.perception_item(td.Scene(s, "red", 2, 0), k).question.replace("circles", "X")
             for s in td.SHAPES for k in td.PERCEPTION_KINDS}
    perception = [i for i, (_, q, _) in enumerate(mixed) if q not in plain]
    assert len(perception) == 10 and max(perception) - min(perception) >= 30  # spread, not bunched
    for i in perception:
        q = mixed[i][1]
        assert any(q.replace(td.PLURAL[s], "X") in {a.replace(td.PLURAL[s], "X") for a in asked} for s in td.SHAPES), q
        assert mixed[i][2].endswith(" .") and "the answer is" in mixed[i][2]
    assert [q for i, (_, q, _) in enumerate(mixed) if i not in perception] == plain[:30]
    assert drift_settings({"replay": 0.25})["replay"] == 0.25
    with pytest.raises(LabError, match="replay = 1.5 is out of range"):
        drift_settings({"replay": 1.5})
    with pytest.raises(LabError, match="replay mixes perception questions into the toy scenes only"):
        drift_settings({"replay": 0.25, "data": "train.jsonl"})
