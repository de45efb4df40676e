"""The bundled toy family: loads offline, generates, answers, evaluates, regenerates (smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from analysis.evaluate import evaluate  # noqa: E402
from tasks.toydata import parse_answer  # noqa: E402
from tests.output_checks import cli  # noqa: E402
from tests.paths import ENV, ROOT, TOY


def _chat(proc, question: str, image: bool) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return proc.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def _generate_text(model, tok, question: str) -> str:
    batch = tok(_chat(tok, question, False), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def vlm():
    model = AutoModelForImageTextToText.from_pretrained(TOY / "vlm").eval()
    return model, AutoProcessor.from_pretrained(TOY / "vlm")


def test_sizes_and_shared_vocab():
    total = sum(f.stat().st_size for d in ("base", "math", "vlm") for f in (TOY / d).iterdir())
    assert total <= 30 * 2**20
    vocabs = [AutoTokenizer.from_pretrained(TOY / d).get_vocab() for d in ("base", "math", "vlm")]
    assert vocabs[0] == vocabs[1] == vocabs[2]


@pytest.mark.parametrize("name", ["base", "math"])
def test_text_models_load_and_generate(name):
    model = AutoModelForCausalLM.from_pretrained(TOY / name).eval()
    tok = AutoTokenizer.from_pretrained(TOY / name)
    text = _generate_text(model, tok, "there are 3 apples . 4 more apples are added . how many apples now ?")
    assert text.strip()
    if name == "math":
        assert parse_answer(text) == "7", text


def test_vlm_answers_sample_perception_questions(vlm):
    model, proc = vlm
    samples = [
        s for s in json.loads((TOY / "samples" / "samples.json").read_text()) if s["suite"] == "perception"
    ]
    assert len(samples) >= 6
    right = 0
    for s in samples:
        image = Image.open(TOY / "samples" / s["image"]).convert("RGB")
        batch = proc(
            text=_chat(proc, s["question"], True), images=image, return_tensors="pt", add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=24, do_sample=False)
        text = proc.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        right += parse_answer(text) == s["answer"]
    # the toy VLM is an imperfect counter (about 60% on the perception suite): at least half
    assert right >= len(samples) // 2, f"{right}/{len(samples)}"


def test_evaluate_accepts_loaded_model(vlm):
    acc = evaluate(vlm, suites=["perception", "visual_math", "text_math"], limit=16)
    assert set(acc) == {"perception", "visual_math", "text_math"}
    assert acc["perception"] >= 0.4 and acc["text_math"] >= 0.5  # the base's one-step word problems, kept
    assert acc["visual_math"] <= 0.25  # ... but after an image it answers the count: what a merge adds


def test_eval_cli_prints_three_suites():
    r = cli("eval", TOY / "vlm", "--limit", "20", module="analysis")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    suites = {"perception", "visual_math", "text_math"}
    assert set(out) == suites | {"ci95", "n"}
    for s in suites:  # each accuracy inside its own 95% interval, on the 20 items asked for
        lo, hi = out["ci95"][s]
        assert 0.0 <= lo <= out[s] <= hi <= 1.0 and out["n"][s] == 20


def test_eval_cli_bad_folder_exits_2(tmp_path):
    r = cli("eval", tmp_path / "nope", module="analysis")
    assert r.returncode == 2
    assert str(tmp_path / "nope") in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_smoke_regeneration_writes_loadable_folders(smoke_family):
    tmp_path, _ = smoke_family
    for name in ("base", "math"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert (
            _generate_text(model, AutoTokenizer.from_pretrained(tmp_path / name), "what is 1 + 2 ?")
            is not None
        )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm")
    proc = AutoProcessor.from_pretrained(tmp_path / "vlm")
    image = Image.open(next((tmp_path / "samples").glob("*.png")))
    batch = proc(
        text=_chat(proc, "how many shapes are there ?", True),
        images=image,
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert model.generate(**batch, max_new_tokens=4, do_sample=False).shape[1] > batch["input_ids"].shape[1]
    for suite in ("perception", "visual_math", "text_math"):
        assert (tmp_path / "eval" / f"{suite}.jsonl").is_file()


def test_math_in_a_second_process_writes_the_same_bytes_as_one_process(smoke_family, tmp_path):
    built, two = smoke_family  # the default: --jobs 2
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_toy_family.py"), "--smoke", "--out",
                        str(tmp_path / "one"), "--jobs", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[math] training in a second process" in two
    # the base on both cores, then math and vlm on one each: the VLM's bytes depend on its thread count
    assert "[base] 3 steps on 2 thread(s)" in two and "[vlm-vision] 2 steps on 1 thread(s)" in two, two
    assert "[vlm-joint] 2 steps on 1 thread(s)" in two, two
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert any(f.parts[0] == "math" and f.suffix == ".safetensors" for f in files)
    assert files == sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (built / f).read_bytes(), f

