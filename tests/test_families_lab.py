"""The whole lab on each of the eight VLM families, each built as its checkpoint ships (family_kits):
the processor loads (without torchvision), a generate with an image through the lab's prompt
builder, the merge to disk (its folder loads and answers), the merge in place and its restore, the
app's worker answering both chat panes, `analysis eval` with images, knockout, attention decay on
the family's own image positions, spectra, similarity and DRIFT. The processors the lab builds itself
are checked in tests/test_family_processors.py.

Oracles: a plain generate() through the prompt builder; the merged folder's and the VLM's own
safetensors (tensor digests, so no name mapping is trusted); where the model itself puts the image
features (its decoder's input embeddings that are not the token embeddings) and each family's
layout rule; singular values and cosines from torch.linalg on the weights transformers loads.
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.family_kits import FAMILIES, NO_TORCHVISION, PROCESSORS, TALL, WIDE, image_layout, scattered
from tests.output_checks import cli

QUESTION = "how many circles are there ?"
TOKENS = 4


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, kits, tmp_path_factory):
    data = tmp_path_factory.mktemp(f"{request.param}-data")
    image = data / "circles.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    items = data / "set" / "items.jsonl"
    items.parent.mkdir()
    Image.new("RGB", (32, 32), (20, 30, 200)).save(items.parent / "a.png")
    items.write_text("\n".join(json.dumps(r) for r in (
        {"question": QUESTION, "answer": "3", "image": "a.png"},
        {"question": "what is 2 + 3 ?", "answer": "5"})) + "\n")
    return request.param, kits(request.param), image, items


def _answer(model, proc, question: str, image, max_new_tokens: int) -> tuple[str, torch.Tensor]:
    """(greedy answer, its new token ids): merging.loading's prompt, the image through the processor."""
    from merging.loading import prompt, tokenizer_of, user_turn

    tok = tokenizer_of(proc)
    text = prompt(proc, [user_turn(question, image is not None)])
    enc = (tok([text], return_tensors="pt", add_special_tokens=False) if image is None else
           proc(text=[text], images=[image], return_tensors="pt", add_special_tokens=False))
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True).strip(), new


def _digest(t: torch.Tensor) -> tuple:
    t = t.detach().contiguous()
    return tuple(t.shape), str(t.dtype), hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _file_digests(folder) -> set:
    return {_digest(t) for f in folder.glob("*.safetensors") for t in load_file(f).values()}


def _state(model) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_merges_to_disk_and_in_place_and_the_worker_answers_both_panes(kit, tmp_path):
    import transformers

    from merging.inplace import InPlaceMerger
    from merging.loading import load_model
    from merging.recipe import from_dict
    from webapp.worker.process import Worker

    family, paths, image, _ = kit
    triple = {k: str(v) for k, v in paths.items()}
    recipe = {**triple, "method": "task_arithmetic", "parameters": {"alpha": 0.8}}
    (tmp_path / "r.yaml").write_text("".join(f"{k}: {v}\n" for k, v in triple.items())
                                     + "method: task_arithmetic\nparameters: {alpha: 0.8}\n")
    out = tmp_path / "merged"
    r = cli("merge", tmp_path / "r.yaml", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    pil = Image.open(image).convert("RGB")
    answers = {}
    for pane, folder in (("merged", out), ("original", paths["vlm"])):
        model, proc = load_model(folder)
        answers[pane], new = _answer(model, proc, QUESTION, pil, TOKENS)
        eos = proc.tokenizer.eos_token_id
        assert len(new) == TOKENS or (len(new) > 0 and new[-1] == eos), (family, pane, new)
    # the processor loads here, without torchvision: the family's own, or the lab's image-only one
    if family == "mistral3":  # model and proc: the original VLM's, loaded last
        assert type(proc).__name__ == ("ImageOnlyPixtralProcessor" if NO_TORCHVISION else "PixtralProcessor")
    else:
        assert isinstance(proc, getattr(transformers, PROCESSORS[family]))
    if NO_TORCHVISION:
        assert type(proc.image_processor).__name__.endswith("Pil")
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path / "cache")})
    res = w.call("chat", {"recipe": recipe, "triple": triple, "question": QUESTION, "image": str(image),
                          "max_new_tokens": TOKENS})
    assert res["answers"] == answers, family
    # in place on the VLM just loaded: its tensors become the merged folder's, then the checkpoint's again
    checkpoint, loaded = _file_digests(paths["vlm"]), _state(model)
    assert {_digest(t) for t in loaded.values()} == checkpoint
    merger = InPlaceMerger.from_recipe(model, from_dict(recipe))
    merger.apply(from_dict(recipe))
    assert {_digest(t) for t in model.state_dict().values()} == _file_digests(out) != checkpoint
    merger.restore()
    restored = model.state_dict()
    assert all(torch.equal(restored[n], t) for n, t in loaded.items()) and restored.keys() == loaded.keys()
    assert {_digest(t) for t in restored.values()} == checkpoint


def _attention_on_the_family_positions(family, model, proc):
    from analysis.attention import build_inputs, image_token_id, measure_shares, text_query_mask

    sizes = (WIDE, TALL)
    inputs = build_inputs(proc, [Image.new("RGB", s, (200, 30, 30)) for s in sizes])
    image_id = image_token_id(model.config)
    for enc, size in zip(inputs, sizes):
        keys, queries = text_query_mask(enc["input_ids"], image_id)
        assert torch.equal(keys, scattered(model, enc)), (family, size)  # the model's own image positions
        tokens = proc.tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
        want, image = image_layout(family, model.config, enc, size), proc.tokenizer.convert_ids_to_tokens(image_id)
        start = next((i for i in range(len(tokens)) if tokens[i:i + len(want)] == want), None)
        assert start is not None, (family, size, tokens)
        assert keys[0].nonzero()[:, 0].tolist() == [start + i for i, t in enumerate(want) if t == image]
        assert int(queries.sum()) > 0
    shares = measure_shares(model, inputs, image_id)
    assert len(shares) == model.config.get_text_config().num_hidden_layers and all(0 < s < 1 for s in shares)
    return inputs


def test_eval_with_images_knockout_and_attention_on_the_family_positions(kit):
    from analysis.evaluate import MAX_NEW_TOKENS, evaluate
    from analysis.knockout import knocked_out, knockout
    from merging.item_file import read_items
    from merging.loading import load_model

    family, paths, _, items_file = kit
    r = cli("eval", paths["vlm"], "--suite-file", items_file, module="analysis")
    assert r.returncode == 0, r.stderr
    model, proc = load_model(paths["vlm"], attentions=True)
    items = read_items(items_file)
    scored = evaluate((model, proc), suites=[], extra={"custom": items}, return_items=True)
    got = json.loads(r.stdout)
    assert got["custom"] == round(scored["accuracy"]["custom"], 4) and got["n"] == {"custom": len(items)}
    recs = scored["items"]["custom"]
    assert [x["question"] for x in recs] == [it["question"] for it in items]
    for it, rec in zip(items, recs):  # each item answered as a plain generate with its image (or none)
        assert rec["output"].strip() == _answer(model, proc, it["question"], it.get("pil"), MAX_NEW_TOKENS)[0]

    def on_file(target, suites, limit, device):
        return evaluate(target, suites=[], extra={"custom": items[:limit]})

    ko = knockout(model, proc, evaluate_fn=on_file, suites=["custom"], limit=2, layers=[0])
    assert ko["baseline"] == scored["accuracy"] and len(ko["accuracy"]["mlp"]["custom"]) == 1
    enc = _attention_on_the_family_positions(family, model, proc)[0]
    with torch.no_grad():
        before = model(**enc).logits
        for group in ("attention", "mlp"):  # the family's decoder layer 0 is what knockout takes out
            with knocked_out(model, 0, group):
                assert not torch.allclose(model(**enc).logits, before), group
        assert torch.equal(model(**enc).logits, before)


def test_spectra_similarity_and_drift(kit, tmp_path):
    from analysis.similarity import cosine, similarity
    from analysis.spectra import MODULES, compute_spectra, open_triple
    from merging.loading import load_model, prompt, user_turn

    family, paths, image, items = kit
    with open_triple(paths["vlm"], paths["reasoner"], paths["base"]) as t:
        spectra = compute_spectra(t, k=4, use_cache=False)
    sim = similarity(paths["vlm"], paths["reasoner"], paths["base"], rank=4, use_cache=False)
    assert len(spectra["entries"]) == len(sim["entries"]) == 2 * len(MODULES)
    # layer 0's down_proj as transformers loads each model, decomposed here
    w = {role: load_model(paths[role])[0].get_decoder().layers[0].mlp.down_proj.weight.detach().double()
         for role in ("vlm", "reasoner", "base")}
    tau_v, tau_r = w["vlm"] - w["base"], w["reasoner"] - w["base"]
    sv, sr = torch.linalg.svdvals(tau_v), torch.linalg.svdvals(tau_r)
    e = next(e for e in spectra["entries"] if e["layer"] == 0 and e["module"] == "mlp.down_proj")
    assert e["s_v"] == pytest.approx(sv[:4].tolist(), rel=1e-3) and e["s_r"] == pytest.approx(sr[:4].tolist(), rel=1e-3)
    assert e["ratio"] == pytest.approx(float(sv.sum() / sr.sum()), rel=1e-3)
    c = next(e for e in sim["entries"] if e["layer"] == 0 and e["module"] == "mlp.down_proj")
    assert c["cos"] == pytest.approx(cosine(tau_v.flatten(), tau_r.flatten()), abs=1e-5)
    recipe = tmp_path / "drift.yaml"
    recipe.write_text(f"vlm: {paths['vlm']}\nreasoner: {paths['reasoner']}\n"
                      f"drift: {{steps: 2, lr: 0.001, batch_size: 2, data: {items}}}\n")
    r = cli("drift", recipe, tmp_path / "drifted", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert _file_digests(tmp_path / "drifted") != _file_digests(paths["vlm"])
    # the processor DRIFT saved reads the image and the prompt as the VLM's own does
    pil = Image.open(image).convert("RGB")
    encs = []
    for folder in (paths["vlm"], tmp_path / "drifted"):
        proc = load_model(folder)[1]
        encs.append(proc(text=[prompt(proc, [user_turn(QUESTION, True)])], images=[pil], return_tensors="pt",
                         add_special_tokens=False))
    assert encs[0].keys() == encs[1].keys() and all(torch.equal(encs[0][k], encs[1][k]) for k in encs[0])


def test_each_kit_is_a_clean_triple(kit):
    """The kits are what a user brings: compatible, and no warning (same tensors, a shared parent)."""
    from merging.compat import check_triple

    family, paths, _, _ = kit
    rep = check_triple(str(paths["vlm"]), str(paths["reasoner"]), str(paths["base"]))
    assert rep.ok and rep.warnings == [], (family, rep.warnings)
    assert rep.layouts["vlm"].family == family and rep.distances["reasoner vs vlm"] < 0.5


@pytest.mark.slow
@pytest.mark.browser
def test_the_app_in_chromium_chats_with_an_image_on_qwen2_vl_and_mistral3(toy_dir, kits, tmp_path):
    """The two families whose processors the lab builds itself, in the real app and a real browser:
    a custom triple from the models root, Merge, an example with its image, both panes answer."""
    from playwright.sync_api import expect

    from tests.app_fixtures import SHOTS, chromium, start_app, stop_app

    root = tmp_path / "models"
    for family in ("qwen2_vl", "mistral3"):
        shutil.copytree(kits(family)["vlm"].parent, root / family)
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
