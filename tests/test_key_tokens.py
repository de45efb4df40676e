"""The chat's key-token probabilities: collected from generate's own logits while the answer streams,
checked against a separate plain forward pass of the whole prompt + answer (softmax of its logits)."""

import pytest
import torch
from PIL import Image

from analysis.key_tokens import key_tokens
from merging.loading import load_model, tokenizer_of
from tests.paths import TOY
from webapp.worker.chat import fit_inputs, stream_answer

QUESTION = "2 squares are taken away . how many squares are left ?"


@pytest.fixture(scope="module")
def vlm():
    return load_model(TOY / "vlm", "cpu")


def test_key_token_probabilities_equal_a_plain_forward_pass(vlm):
    model, proc = vlm
    tok = tokenizer_of(proc)
    image = Image.open(TOY / "samples" / "sample_0.png").convert("RGB")
    got = {}
    text = stream_answer(model, proc, QUESTION, image, on_logits=lambda ids, logits: got.update(ids=ids, logits=logits))
    rows = key_tokens(tok, got["ids"], got["logits"])
    # the toy's word-level answer: one token per word, so each key's index is its word's index
    words = text.split()
    numbers = [i for i, w in enumerate(words) if w.isdigit()]
    expect = {"count": numbers[0], "answer": words.index("is", words.index("answer")) + 1}
    if "-" in words or "+" in words:
        op = next(i for i, w in enumerate(words) if w in "+-")
        expect.update(operator=op, result=words.index("=") + 1)
    assert {r["role"]: r["position"] for r in rows} == expect

    inputs, _, _ = fit_inputs(model, proc, QUESTION, image)
    prompt_len = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([got["ids"]])], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids)).logits[0]
    for r in rows:
        probs = torch.softmax(logits[prompt_len + r["position"] - 1].double(), 0)
        assert r["token"] == words[r["position"]]
        assert r["prob"] == pytest.approx(float(probs[got["ids"][r["position"]]]), abs=1e-4)
        top = torch.topk(probs, 5)
        assert [t for t, _ in r["top"]] == [tok.decode([int(i)]).strip() for i in top.indices]
        assert [p for _, p in r["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert r["top"][0][1] >= r["top"][-1][1]


def test_an_answer_without_numbers_has_only_its_final_word(vlm):
    model, proc = vlm
    image = Image.open(TOY / "samples" / "sample_2.png").convert("RGB")
    got = {}
    text = stream_answer(model, proc, "what color are the triangles ?", image,
                         on_logits=lambda ids, logits: got.update(ids=ids, logits=logits))
    rows = key_tokens(tokenizer_of(proc), got["ids"], got["logits"])
    assert [r["role"] for r in rows] == ["answer"] and rows[0]["token"] == text.split()[-2]
