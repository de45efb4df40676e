"""The loadable synthetic triple (tests/benchmarks/make_synthetic.py make-loadable), tiny preset:
transformers loads all three folders, the tokenizer covers the vocabulary, the processor's image
tokens match the model, and the fine-tunes sit the intended distance from the base."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
import make_synthetic as ms  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    result = ms.make_loadable(root, "tiny")
    assert result["built"]
    return root


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def test_transformers_loads_every_tensor(family):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vlm, info = AutoModelForImageTextToText.from_pretrained(family / "vlm", output_loading_info=True)
    assert type(vlm).__name__ == "LlavaForConditionalGeneration"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert vlm.lm_head.weight.data_ptr() == vlm.model.language_model.embed_tokens.weight.data_ptr()  # tied
    for role in ("reasoner", "base"):
        lm, info = AutoModelForCausalLM.from_pretrained(family / role, output_loading_info=True)
        assert type(lm).__name__ == "Qwen2ForCausalLM"
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (role, info)
        assert lm.config.num_hidden_layers == ms.LOADABLE["tiny"]["layers"]


def test_tokenizer_covers_the_vocabulary(family):
    from transformers import AutoTokenizer

    vocab = json.loads((family / "base" / "config.json").read_text())["vocab_size"]
    loaded = {role: AutoTokenizer.from_pretrained(family / role) for role in ("vlm", "base")}
    assert type(loaded["base"]).__name__ == "Qwen2Tokenizer"  # what transformers makes of any qwen2 folder
    ids = list(range(vocab))
    for tok in loaded.values():
        assert len(tok) == vocab
        tokens = tok.convert_ids_to_tokens(ids)
        assert len(set(tokens)) == vocab and all(tokens)
        assert tok.convert_tokens_to_ids(tokens) == ids  # every id is its own token
        assert all(isinstance(tok.decode([i]), str) for i in ids)
    text = " how many circles ? the answer is 7 . what color is the square ? assistant :"
    for tok in loaded.values():
        got = tok(text, add_special_tokens=False)["input_ids"]
        assert len(got) == len(text.split()) + 1  # one token a word; " 7" is " " + "7": Qwen2 splits digits
        assert tok.decode(got) == text
    prompt = "<s> user : <image> how many circles ? assistant :"
    assert loaded["vlm"](prompt)["input_ids"] == loaded["base"](prompt)["input_ids"]  # both load paths agree


def test_processor_image_tokens_and_forward(family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(family / "vlm")
    model = AutoModelForImageTextToText.from_pretrained(family / "vlm", dtype=torch.float32).eval()
    v = model.config.vision_config
    want = (v.image_size // v.patch_size) ** 2  # patches; the "default" strategy drops CLS
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many circles ?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<s> user : <image> how many circles ? assistant :"
    inputs = proc(images=Image.new("RGB", (80, 60), (200, 30, 30)), text=text, return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_index).sum()) == want
    assert tuple(inputs["pixel_values"].shape) == (1, 3, v.image_size, v.image_size)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, len(ids), model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_fine_tunes_are_small_moves_off_the_base(family):
    base, reasoner, vlm = (tensors(family / r) for r in ("base", "reasoner", "vlm"))
    assert set(base) == set(reasoner)
    lm = {k: "model.language_model." + k[len("model."):] for k in base}
    assert set(lm.values()) <= set(vlm)
    others = set(vlm) - set(lm.values())
    assert others and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in others)
    noise = {"vlm": ms.NOISE["vlm"], "reasoner": ms.NOISE["reasoner"]}
    noise["vlm-reasoner"] = math.hypot(noise["vlm"], noise["reasoner"])  # independent draws
    for k, b in base.items():
        if k.endswith("norm.weight"):  # ones + noise: the 0.002 moves are below bf16's spacing near 1
            assert abs(float(b.float().mean()) - 1.0) < 0.02
            continue
        b, v, r = b.double(), vlm[lm[k]].double(), reasoner[k].double()
        tol = 5 / math.sqrt(2 * b.numel()) + 0.01  # 5 standard errors of a std estimate, + bf16 rounding
        assert float(b.std()) == pytest.approx(0.02, rel=tol), k
        for what, diff in (("vlm", v - b), ("reasoner", r - b), ("vlm-reasoner", v - r)):
            rms = float(diff.norm()) / math.sqrt(diff.numel())
            assert rms == pytest.approx(noise[what], rel=tol), (what, k, rms)


def test_merged_triple_loads_and_holds_the_task_vector(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from merging import recipe as recipe_mod
    from merging.engine import merge_to_disk

    out = merge_to_disk(recipe_mod.load(family / "recipe_task_arithmetic.yaml"), tmp_path / "merged", bar=False)
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    merged, base, reasoner, vlm = (tensors(p) for p in (out, family / "base", family / "reasoner", family / "vlm"))
    assert set(merged) == set(vlm)
    for k, t in merged.items():
        lm = k.startswith("model.language_model.") and not k.endswith("embed_tokens.weight")
        if lm:  # every layer and the final norm: W_v + (W_r - W_0) (alpha 1), in float32
            canon = "model." + k[len("model.language_model."):]
            want = (vlm[k].float() + (reasoner[canon].float() - base[canon].float())).to(torch.bfloat16)
            assert torch.equal(t, want), k
        else:  # embeddings (not asked for), vision tower, projector: the VLM's own bits
            assert torch.equal(t, vlm[k]), k
