"""The whole lab on each of the eight VLM families, each built as its checkpoint ships (family_kits):
the processor loads (without torchvision), the app's worker merges in place and answers both chat
panes with an image, the merge to disk loads, evaluation with images, attention decay on the
family's own image-token positions, knockout, spectra, similarity and DRIFT on a JSONL.

Oracles: the worker's panes against a plain generate() of the merged folder and of the original
VLM; the in-place weights against the disk merge's tensors; the restored VLM against its checkpoint;
the image positions against the count each family's vision tower produces for a 32 x 32 image.
"""

from __future__ import annotations

import json
import queue

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.family_kits import FAMILIES, build
from tests.output_checks import cli

QUESTION = "how many circles are there ?"
TOKENS = 4
# image-token positions per 32 x 32 image, from each family's vision layout: LLaVA (32/8)^2 patches;
# LLaVA-NeXT the base image plus one 32 x 32 tile with a newline per row, (16 + 16 + 4); Idefics2 its
# 4 resampler latents; Idefics3 a 2 x 2 split plus the global image, 4 tokens each; Qwen2-VL and
# Qwen2.5-VL the (32/4)^2 patches merged 2 x 2; Mistral3 (32/16)^2 merged patches; Gemma3 4 soft tokens.
IMAGE_POSITIONS = {"llava": 16, "llava_next": 36, "idefics2": 4, "idefics3": 20, "qwen2_vl": 16, "qwen2_5_vl": 16,
                   "mistral3": 4, "gemma3": 4}


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    paths = build(request.param, root / "models")
    image = root / "circles.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    items = root / "set" / "items.jsonl"
    items.parent.mkdir()
    Image.new("RGB", (32, 32), (20, 30, 200)).save(items.parent / "a.png")
    items.write_text("\n".join(json.dumps(r) for r in (
        {"question": QUESTION, "answer": "3", "image": "a.png"},
        {"question": "what is 2 + 3 ?", "answer": "5"})) + "\n")
    return request.param, paths, image, items


def _plain(folder, image) -> str:
    from merging.loading import load_model, prompt, user_turn

    model, proc = load_model(folder)
    enc = proc(text=[prompt(proc, [user_turn(QUESTION, True)])], images=[Image.open(image).convert("RGB")],
               return_tensors="pt", add_special_tokens=False)
    enc = {k: v for k, v in enc.items() if k != "mm_token_type_ids"}
    tok = getattr(proc, "tokenizer", proc)
    out = model.generate(**enc, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_worker_merges_in_place_and_answers_both_panes(kit, tmp_path):
    from webapp.worker import Worker

    family, paths, image, _ = kit
    triple = {k: str(v) for k, v in paths.items()}
    recipe = {**triple, "method": "task_arithmetic", "parameters": {"alpha": 0.8}}
    out = tmp_path / "merged"
    (tmp_path / "r.yaml").write_text("".join(f"{k}: {v}\n" for k, v in triple.items())
                                     + "method: task_arithmetic\nparameters: {alpha: 0.8}\n")
    r = cli("merge", tmp_path / "r.yaml", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path / "cache")})
    res = w.call("chat", {"recipe": recipe, "triple": triple, "question": QUESTION, "image": str(image),
                          "max_new_tokens": TOKENS})
    assert res["answers"]["merged"] == _plain(out, image), family
    assert res["answers"]["original"] == _plain(paths["vlm"], image), family
    loaded = w.models.loaded
    live = dict(loaded.model.state_dict())
    loaded.hold(recipe)  # the merge, live again: its LM tensors equal the disk merge's (float32 both)
    disk = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    live = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    changed = [n for n, t in live.items() if n in disk and not torch.equal(t, disk[n].float())]
    assert not changed, changed[:3]
    loaded.hold(None)
    ckpt = {k: v for f in paths["vlm"].glob("*.safetensors") for k, v in load_file(f).items()}
    restored = loaded.model.state_dict()
    assert all(torch.equal(restored[n], t) for n, t in ckpt.items() if n in restored)


def test_eval_with_images_knockout_and_attention(kit):
    from analysis.attention import build_inputs, image_token_id, measure_shares, text_query_mask
    from analysis.evaluate import evaluate
    from analysis.knockout import knockout
    from merging.item_file import read_items
    from merging.loading import load_model

    family, paths, image, items_file = kit
    r = cli("eval", paths["vlm"], "--suite-file", items_file, module="analysis")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"custom"}
    model, proc = load_model(paths["vlm"], attentions=True)
    items = read_items(items_file)
    scored = evaluate((model, proc), suites=[], extra={"custom": items}, return_items=True)
    assert len(scored["items"]["custom"]) == 2 and 0 <= scored["accuracy"]["custom"] <= 1

    def on_file(target, suites, limit, device):
        return evaluate(target, suites=[], extra={"custom": items[:limit]})

    ko = knockout(model, proc, evaluate_fn=on_file, suites=["custom"], limit=2, layers=[0])
    assert set(ko["drop"]) == {"attention", "mlp"} and len(ko["drop"]["attention"]["custom"]) == 1
    inputs = build_inputs(proc, [Image.open(image).convert("RGB")])
    image_id = image_token_id(model.config)
    ids = inputs[0]["input_ids"]
    assert int((ids == image_id).sum()) == IMAGE_POSITIONS[family]
    keys, queries = text_query_mask(ids, image_id)
    assert int(keys.sum()) == IMAGE_POSITIONS[family] and int(queries.sum()) > 0
    shares = measure_shares(model, inputs, image_id)
    assert len(shares) == model.config.get_text_config().num_hidden_layers
    assert all(0 < s < 1 for s in shares)


def test_spectra_similarity_and_drift(kit, tmp_path):
    from analysis.similarity import similarity
    from analysis.spectra import compute_spectra, open_triple
    from merging.loading import load_model

    family, paths, image, items = kit
    with open_triple(paths["vlm"], paths["reasoner"], paths["base"]) as t:
        spectra = compute_spectra(t, k=4, use_cache=False)
    assert spectra["num_layers"] == 2 and all(e["ratio"] > 0 for e in spectra["entries"])
    sim = similarity(paths["vlm"], paths["reasoner"], paths["base"], rank=4, use_cache=False)
    assert sim["num_layers"] == 2
    recipe = tmp_path / "drift.yaml"
    recipe.write_text(f"vlm: {paths['vlm']}\nreasoner: {paths['reasoner']}\n"
                      f"drift: {{steps: 2, lr: 0.001, batch_size: 2, data: {items}}}\n")
    r = cli("drift", recipe, tmp_path / "drifted", "--no-progress")
    assert r.returncode == 0, r.stderr
    model, proc = load_model(tmp_path / "drifted")
    assert type(model).__name__.lower().startswith(family.split("_")[0].replace("qwen2", "qwen2"))


def test_a_processor_that_needs_a_missing_torchvision_is_named(tmp_path):
    """Qwen2-VL's own processor needs torchvision (its video part): the lab builds the image-only one;
    a family the lab has no image-only processor for gets one line naming torchvision."""
    import importlib.util

    from merging.errors import LabError
    from merging.processors import first_line, load_processor

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    paths = build("qwen2_vl", tmp_path / "m")
    proc = load_processor(paths["vlm"], "qwen2_vl")
    assert proc.image_processor.__class__.__name__.endswith("Pil") and not hasattr(proc, "video_processor")
    with pytest.raises(LabError) as e:
        load_processor(paths["vlm"], "some_family")
    msg = str(e.value)
    assert msg.startswith("some_family's processor needs torchvision, which is not installed: pip install torchvision")
    assert "\n" not in msg and not msg.endswith(": )")
    assert first_line(ImportError("\nPixtralProcessor requires the Torchvision library\nmore")) == \
        "PixtralProcessor requires the Torchvision library"


def test_each_kit_is_a_clean_triple(kit):
    """The kits are what a user brings: compatible, and no warning (same tensors, a shared parent)."""
    from merging.compat import check_triple

    family, paths, _, _ = kit
    rep = check_triple(str(paths["vlm"]), str(paths["reasoner"]), str(paths["base"]))
    assert rep.ok and rep.warnings == [], (family, rep.warnings)
    assert rep.layouts["vlm"].family == family and rep.distances["reasoner vs vlm"] < 0.5


@pytest.mark.slow
@pytest.mark.browser
def test_the_app_in_chromium_chats_with_an_image_on_qwen2_vl_and_mistral3(toy_dir, tmp_path):
    """The two families whose processors the lab builds itself, in the real app and a real browser:
    a custom triple from the models root, Merge, an example with its image, both panes answer."""
    from playwright.sync_api import expect

    from tests.app_fixtures import SHOTS, chromium, start_app, stop_app

    root = tmp_path / "models"
    for family in ("qwen2_vl", "mistral3"):
        build(family, root / family)
    proc, url = start_app(toy_dir, tmp_path / "cache", tmp_path / "app.log", ["--models-root", str(root)])
    try:
        with chromium() as browser:
            for family in ("qwen2_vl", "mistral3"):
                page = browser.new_page(viewport={"width": 1300, "height": 1100})
                page.goto(f"{url}?vlm={family}/vlm&reasoner={family}/reasoner&base={family}/base")
                expect(page.get_by_text("Compatible: ready to merge")).to_be_visible(timeout=60_000)
                page.locator("#merge-btn").click()
                expect(page.locator("#merge-status")).to_contain_text("Merged with", timeout=120_000)
                page.locator(".gallery-item, [data-testid='examples'] button, .examples button, table.examples td").first.click()
                for pane, who in (("#chat-merged", "task_arithmetic"), ("#chat-original", "the original VLM")):
                    bot = page.locator(f"{pane} .message.bot, {pane} [data-testid='bot']").last
                    expect(bot).to_contain_text(f"answered by: {who}", timeout=120_000)
                expect(page.locator("#chat-merged img").first).to_be_visible()  # the question went with its image
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(SHOTS / f"family_{family}_chat.png"))
                page.close()
    finally:
        stop_app(proc)
