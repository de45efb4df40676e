"""The analyses on constructed task vectors and on tiny real LLaVA / Llama models."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis import attention, changes, figures, knockout, similarity, spectra
from tests.factories import IMAGE_TOKEN, make_tiny_triple
from tests.paths import ROOT

UP = "language_model.model.layers.0.mlp.up_proj.weight"  # old LLaVA layout in the tiny VLM
S_TRUE = [5.0, 3.0, 1.0, 0.5]


def _rewrite(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def add_tiny_processor(vlm_dir: Path) -> None:
    """A LlavaProcessor for the tiny VLM: word-level tokenizer, 32 px images -> 16 image tokens."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "describe", "the", "image", ".", "user", ":", "assistant"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = IMAGE_TOKEN
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    proc.save_pretrained(vlm_dir)


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    """Tiny triple; the VLM's layer-0 up_proj task vector is U diag(S_TRUE) V^T exactly."""
    paths = make_tiny_triple(tmp_path_factory.mktemp("triple"), num_layers=2)
    w0 = load_file(paths["base"] / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(w0.shape[0], 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(w0.shape[1], 4, generator=g))
    tau = u @ torch.diag(torch.tensor(S_TRUE)) @ v.T
    _rewrite(paths["vlm"], lambda sd: sd.__setitem__(UP, w0 + tau))
    add_tiny_processor(paths["vlm"])
    return paths


@pytest.fixture(scope="module")
def vlm_model(triple):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(triple["vlm"], attn_implementation="eager").eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[2, 8, 9] + [IMAGE_TOKEN] * 16 + [4, 5, 6, 7, 10, 9]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


# ------------------------------------------------------------------------------------ spectra
def test_spectra_recover_constructed_singular_values(triple):
    res = spectra.spectra(triple["vlm"], triple["reasoner"], triple["base"], k=8, use_cache=False)
    assert res["num_layers"] == 2 and res["modules"] == list(spectra.MODULES)
    e = next(e for e in res["entries"] if e["layer"] == 0 and e["module"] == "mlp.up_proj")
    assert e["s_v"][:4] == pytest.approx(S_TRUE, rel=1e-4)
    assert max(e["s_v"][4:]) < 1e-4  # rank 4: the rest vanish
    assert e["nuclear_v"] == pytest.approx(sum(S_TRUE), rel=1e-3) and e["exact"]
    assert e["ratio"] == pytest.approx(e["nuclear_v"] / e["nuclear_r"])
    assert res["ratio"][0][res["modules"].index("mlp.up_proj")] == e["ratio"]


def test_randomized_spectrum_matches_exact_on_low_rank():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(300, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 4, generator=g))
    m = u @ torch.diag(torch.tensor(S_TRUE)) @ v.T
    s, nuc, exact = spectra.spectrum(m, 4, "lowrank")
    assert s == pytest.approx(S_TRUE, rel=1e-3) and not exact and nuc == pytest.approx(sum(S_TRUE), rel=1e-3)


# --------------------------------------------------------------------------------- similarity
def test_cosine_of_orthogonal_parallel_and_opposite_task_vectors():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 8, generator=g)
    b = torch.randn(16, 8, generator=g)
    b_orth = b - (a * b).sum() / (a * a).sum() * a
    assert similarity.cosine(a, b_orth) == pytest.approx(0.0, abs=1e-6)
    assert similarity.cosine(a, 3 * a) == pytest.approx(1.0, abs=1e-6)
    assert similarity.cosine(a, -a) == pytest.approx(-1.0, abs=1e-6)
    assert similarity.cosine(a, torch.zeros_like(a)) == 0.0


def test_similarity_on_a_triple_with_parallel_and_orthogonal_layers(triple, tmp_path):
    """Reasoner := base + 2 tau_v in layer 1 (parallel); layer-0 up_proj gets an orthogonal tau_r."""
    reasoner = tmp_path / "reasoner"
    shutil.copytree(triple["reasoner"], reasoner)
    base, vlm = load_file(triple["base"] / "model.safetensors"), load_file(triple["vlm"] / "model.safetensors")

    def edit(sd):
        for name in [n for n in sd if n.startswith("model.layers.1.")]:
            sd[name] = base[name] + 2 * (vlm["language_model." + name] - base[name])
        w0 = base["model.layers.0.mlp.up_proj.weight"]
        tau_v = vlm[UP] - w0  # rows span a 4-dim space; put tau_r's rows in its complement
        q, _ = torch.linalg.qr(torch.cat([torch.linalg.svd(tau_v)[2][:4].T, torch.randn(32, 4)], 1))
        sd["model.layers.0.mlp.up_proj.weight"] = w0 + torch.randn(64, 4) @ q[:, 4:8].T

    _rewrite(reasoner, edit)
    res = similarity.similarity(triple["vlm"], reasoner, triple["base"], rank=4, use_cache=False)
    col = res["modules"].index("mlp.up_proj")
    assert res["block_cos"][1] == pytest.approx(1.0, abs=1e-5)
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in res["cos"][1])
    assert all(s == pytest.approx(1.0, abs=1e-4) for s in res["subspace"][1])
    assert res["cos"][0][col] == pytest.approx(0.0, abs=1e-5)
    assert res["subspace"][0][col] == pytest.approx(0.0, abs=1e-4)
    assert -0.5 < res["block_cos"][0] < 0.5


# ---------------------------------------------------------------------------------- attention
def test_exponential_fit_recovers_beta():
    clean = [0.4 * math.exp(-0.3 * i) for i in range(12)]
    fit = attention.fit_decay(clean)
    assert fit["beta"] == pytest.approx(0.3, abs=1e-9) and fit["C"] == pytest.approx(0.4) and fit["r2"] > 0.999
    g = torch.Generator().manual_seed(3)
    noisy = [a * float(1 + 0.03 * torch.randn(1, generator=g)) for a in clean]
    assert attention.fit_decay(noisy)["beta"] == pytest.approx(0.3, abs=0.02)


def test_attention_shares_on_tiny_llava_match_a_manual_computation(vlm_model):
    batches = [_inputs(0), _inputs(1)]
    with torch.no_grad():
        outs = [vlm_model(**b, output_attentions=True) for b in batches]
    ids = batches[0]["input_ids"][0]
    img = ids == IMAGE_TOKEN
    first = int(img.nonzero()[0])
    manual = []
    for out in outs:
        per_layer = []
        for a in out.attentions:
            vals = []
            for h in range(a.shape[1]):
                for q in range(first + 1, len(ids)):
                    if img[q]:
                        continue
                    to_img = sum(float(a[0, h, q, k]) for k in range(len(ids)) if img[k])
                    to_txt = sum(float(a[0, h, q, k]) for k in range(len(ids)) if not img[k])
                    assert to_img + to_txt == pytest.approx(1.0, abs=1e-5)  # rows are distributions
                    vals.append(to_img / (to_img + to_txt))
            per_layer.append(sum(vals) / len(vals))
        manual.append(per_layer)
    shares = attention.measure_shares(vlm_model, batches, attention.image_token_id(vlm_model.config))
    assert len(shares) == 2
    expected = [(x + y) / 2 for x, y in zip(*manual)]
    assert shares == pytest.approx(expected, abs=1e-6)
    assert all(0.0 < s < 1.0 for s in shares)


def test_attention_decay_end_to_end_with_the_processor(triple, tmp_path):
    from PIL import Image

    from merging.loading import load_model

    model, proc = load_model(triple["vlm"], attentions=True)
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(img)
    res = attention.attention_decay(model, proc, [img, Image.new("RGB", (32, 32), (0, 90, 200))])
    assert res["n_images"] == 2 and len(res["shares"]) == 2 and len(res["prior_v"]) == 2
    assert res["prior_v"][0] == 1.0 and all(0.0 <= w <= 1.0 for w in res["prior_v"])
    want = [min(1.0, math.exp(-res["beta"] * i)) for i in range(2)]
    assert res["prior_v"] == pytest.approx(want) and res["prior_r"] == pytest.approx([1 - w for w in want])


# ----------------------------------------------------------------------------------- knockout
def test_knockout_changes_logits_and_restores_bit_identical_weights(vlm_model):
    before = {k: v.clone() for k, v in vlm_model.state_dict().items()}
    batch = _inputs()
    with torch.no_grad():
        ref = vlm_model(**batch).logits
        for group in ("attention", "mlp"):
            with knockout.knocked_out(vlm_model, 1, group):
                w = knockout.decoder_layers(vlm_model)[1].get_submodule(knockout.GROUPS[group][-1]).weight
                assert torch.all(w == 1.0 / w.shape[0])
                assert not torch.allclose(vlm_model(**batch).logits, ref)
        after = vlm_model(**batch).logits
    assert torch.equal(after, ref)
    for k, v in vlm_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_knockout_sweep_with_a_cheap_real_forward_score(vlm_model):
    """Score = probability of a fixed answer token, computed with a real forward pass."""
    batch = _inputs()
    calls = []

    def score(model, suites, limit, device):
        calls.append(limit)
        with torch.no_grad():
            p = model(**batch).logits[0, -1].softmax(-1)
        return {"perception": float(p[7]), "visual_math": float(p[9])}

    seen = []
    res = knockout.knockout(vlm_model, evaluate_fn=score, suites=("perception", "visual_math"), limit=3,
                            progress=lambda d, t, m: seen.append((d, t)))
    assert "drop_ci" not in res and res["control"] is None  # accuracies alone: no per-item outcomes
    assert len(calls) == 1 + 2 * 2 and set(calls) == {3}
    assert res["layers"] == [0, 1] and set(res["drop"]) == {"attention", "mlp"}
    for g in res["drop"]:
        for s in res["suites"]:
            assert len(res["drop"][g][s]) == 2
            assert res["drop"][g][s] == pytest.approx([res["baseline"][s] - a for a in res["accuracy"][g][s]])
    assert any(abs(d) > 1e-6 for g in res["drop"].values() for v in g.values() for d in v)
    assert seen[-1] == (5, 5)
    assert score(vlm_model, None, None, "cpu") == res["baseline"]  # restored


# ------------------------------------------------------------------------------------ changes
def test_change_map_from_folder_and_from_loaded_model(triple, tmp_path, vlm_model):
    merged = tmp_path / "merged"
    shutil.copytree(triple["vlm"], merged)
    name = "language_model.model.layers.1.self_attn.v_proj.weight"
    _rewrite(merged, lambda sd: sd.__setitem__(name, sd[name] * 1.5))
    res = changes.change_map(merged, triple["vlm"])
    col = res["modules"].index("self_attn.v_proj")
    assert res["rel"][1][col] == pytest.approx(0.5, rel=1e-5) and res["max"] == pytest.approx(0.5, rel=1e-5)
    assert sum(v for row in res["rel"] for v in row) == pytest.approx(0.5, rel=1e-5)
    assert "input_layernorm" in res["modules"]
    same = changes.change_map(vlm_model, triple["vlm"])
    assert same["max"] == 0.0 and same["modules"] == res["modules"]


# ------------------------------------------------------------------------------------ figures
def test_every_figure_builds_with_readable_hover_text(triple):
    sp = spectra.spectra(triple["vlm"], triple["reasoner"], triple["base"], k=8, use_cache=False)
    si = similarity.similarity(triple["vlm"], triple["reasoner"], triple["base"], rank=4, use_cache=False)
    att = {"shares": [0.3, 0.2, 0.1], "beta": 0.5, "C": 0.3, "r2": 0.9, "n_images": 2}
    ko = {"suites": ["perception", "visual_math"], "layers": [0, 1], "baseline": {"perception": 1.0, "visual_math": 0.5},
          "drop": {g: {"perception": [0.5, 0.0], "visual_math": [0.0, 0.25]} for g in ("attention", "mlp")}}
    ch = {"modules": ["mlp.up_proj"], "rel": [[0.1], [None]]}
    figs = [figures.spectra_figure(sp), figures.ratio_figure(sp), figures.similarity_figure(si),
            figures.attention_figure(att), figures.knockout_figure({"VLM": ko, "merged": ko}),
            figures.changes_figure(ch)]
    for f in figs:
        assert isinstance(f, go.Figure) and f.layout.title.text
    assert figs[0].layout.yaxis.type == "log" and len(figs[0].layout.sliders[0].steps) == 2
    assert len(figs[0].data) == 14 and figs[0].layout.updatemenus[0].buttons[-1].label == "all modules"
    assert any("layer 0, mlp.up_proj: cos = " in t for t in figs[2].data[0].text[0])
    assert "β = 0.500" in figs[3].data[1].name
    assert len(figs[4].data) == 2 * 2 * 2
    assert "layer 0, mlp.up_proj: relative norm change 10.00%" in figs[5].data[0].text[0][0]
    # readable at a glance: whole-layer ticks, intact accuracy in the legend, one colour per module
    assert figs[3].layout.xaxis.dtick == 1
    assert figs[4].data[0].name == "VLM: perception (intact 100%)"
    assert "β = 0.500" in figs[3].data[1].name and "decays with depth" in figs[3].layout.title.text
    all_modules = figs[0].layout.updatemenus[0].buttons[-1].args[0]["line.color"]
    assert len(set(all_modules)) == 7 and all_modules[0] == all_modules[1]


# ------------------------------------------------------------------------------------- report
def _run_cli(*args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MERGE_LAB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "analysis", "report", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_report_writes_html_and_json(triple, tmp_path):
    pytest.importorskip("merging.engine")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"vlm: {triple['vlm']}\nreasoner: {triple['reasoner']}\nbase: {triple['base']}\n"
                      f"method: task_arithmetic\nparameters: {{alpha: 0.5}}\n")
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 10)).save(img)
    out = tmp_path / "report"
    r = _run_cli(recipe, out, "--images", img, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "report.json").read_text())
    assert set(data["results"]) == {"spectra", "similarity", "attention", "changes"}
    assert "knockout" in data["skipped"] and len(data["frank_prior_v"]) == 2
    for name in ("spectra", "nuclear_ratio", "similarity", "attention", "changes"):
        html = (out / f"{name}.html").read_text()
        # plotly.js embedded (works offline): megabytes of script, no CDN <script src>
        assert "<html>" in html and len(html) > 1_000_000 and 'src="https://cdn.plot.ly' not in html
    assert data["results"]["changes"]["max"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    r2 = _run_cli(recipe, out, "--images", img, cache=tmp_path / "cache")  # cached; replaces the folder
    assert r2.returncode == 0 and json.loads((out / "report.json").read_text())["results"] == data["results"]


def test_report_missing_recipe_exits_2_with_one_line(tmp_path):
    r = _run_cli(tmp_path / "nope.yaml", tmp_path / "out", cache=tmp_path / "cache")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "recipe file not found" in r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- handout
@pytest.mark.slow
def test_handout_is_one_offline_file_with_both_models_scores(triple, tmp_path):
    """`analysis handout`: one HTML file that fetches nothing, each analysis' title and figure, and the
    scores of the VLM and the merge equal to separate `evaluate` runs of the two models on the same items.
    A second run replaces its own earlier handout; a file the lab did not write is never replaced."""
    import re

    from analysis.evaluate import evaluate
    from analysis.handout import GENERATOR
    from merging import recipe as recipe_mod
    from merging.engine import merge_to_disk
    from tests.output_checks import cli, one_line

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"vlm: {triple['vlm']}\nreasoner: {triple['reasoner']}\nbase: {triple['base']}\n"
                      f"method: task_arithmetic\nparameters: {{alpha: 0.5}}\n")
    out = tmp_path / "notes" / "handout.html"
    r = cli("handout", recipe, out, "--limit", 3, "--cache-dir", tmp_path / "cache", module="analysis")
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert GENERATOR in text[:400] and not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']https?:", text)
    for title in ("Similarity", "Singular values"):
        assert f"<h2>{title}</h2>" in text
    assert text.count("plotly-graph-div") >= 4
    merged = tmp_path / "merged"
    merge_to_disk(recipe_mod.load(recipe), merged, bar=False)
    for which, folder in (("vlm", triple["vlm"]), ("merge", merged)):
        acc = evaluate(folder, ["text_math", "perception", "visual_math"], limit=3)
        for suite, value in acc.items():
            row = re.search(rf"<tr><td>{suite}</td><td>([\d.]+) \[[^<]*</td><td>([\d.]+) \[", text)
            assert row, suite
            assert float(row.group(1 if which == "vlm" else 2)) == pytest.approx(value, abs=0.006), (which, suite)
    assert not [p.name for p in out.parent.iterdir() if p.name != "handout.html"]  # no temp file left
    again = cli("handout", recipe, out, "--limit", 3, "--cache-dir", tmp_path / "cache", module="analysis")
    assert again.returncode == 0, again.stderr[-3000:]
    foreign = tmp_path / "notes" / "mine.html"
    foreign.write_text("<html>my own notes</html>")
    refused = cli("handout", recipe, foreign, "--limit", 3, "--cache-dir", tmp_path / "cache", module="analysis")
    one_line(refused, 2, "was not written by the lab")
    assert foreign.read_text() == "<html>my own notes</html>"
