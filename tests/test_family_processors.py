"""The processors the lab builds itself where a family's own needs torchvision (image-only Qwen2-VL /
Qwen2.5-VL, Pixtral for Mistral3), each against its parts and what transformers reads back, and the
one-line errors for what is missing. The families are tests.family_kits' miniatures (the `kits` fixture).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.family_kits import NO_TORCHVISION, PROCESSORS, TALL, WIDE
from tests.output_checks import one_line
from tests.paths import ENV, ROOT


@pytest.mark.skipif(not NO_TORCHVISION, reason="torchvision is installed here: the family's own processor loads")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_the_image_only_qwen_processor_equals_its_parts(kits, family, tmp_path):
    """The family's processor without its video part: pixel values from the family's image processor
    alone, and one <|image_pad|> per spatial_merge_size^2 patches of the grid, for a wide and a tall image."""
    import transformers

    from merging.processors import load_processor

    folder = kits(family)["vlm"]
    proc = load_processor(folder, family)
    assert not hasattr(proc, "video_processor")
    alone = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>how many circles ?<|im_end|>"
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for size in (WIDE, TALL):
        im = Image.new("RGB", size, (200, 30, 30))
        enc = proc(images=[im], text=[text], return_tensors="pt")
        pix = alone([im], return_tensors="pt")
        assert torch.equal(enc["pixel_values"], pix["pixel_values"])
        assert torch.equal(enc["image_grid_thw"], pix["image_grid_thw"])
        n = int(pix["image_grid_thw"].prod()) // 4
        ids = proc.tokenizer([text.replace("<|image_pad|>", "<|image_pad|>" * n)], return_tensors="pt")["input_ids"]
        assert torch.equal(enc["input_ids"], ids)
        assert torch.equal(enc["mm_token_type_ids"], (ids == pad).to(enc["mm_token_type_ids"].dtype))
    proc.save_pretrained(tmp_path)  # what DRIFT writes: the processor's files as the checkpoint ships them
    shipped = {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert {p.name for p in tmp_path.iterdir()} == shipped <= {p.name for p in folder.iterdir()}
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["processor_class"] == PROCESSORS[family]
    errors = []  # transformers reads both alike: as far as the video processor, which wants torchvision
    for f in (folder, tmp_path):
        with pytest.raises(ImportError) as e:
            transformers.AutoProcessor.from_pretrained(f)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "VideoProcessor requires the Torchvision library" in errors[0]
    again = load_processor(tmp_path, family)(images=[im], text=[text], return_tensors="pt")
    assert all(torch.equal(again[k], enc[k]) for k in enc)


def _init_parameters(module: str, cls: str) -> set[str]:
    """The parameters of a transformers class's __init__, read from its source (the module itself
    imports torchvision)."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg for a in init.args.args + init.args.kwonlyargs}


def test_the_pixtral_processor_lays_out_rows_and_saves_what_transformers_reads(kits, tmp_path):
    """Mistral3 (Pixtral): a batch of a wide, a tall and a square image, checked token by token against
    the layout written out here and by the model's own forward (it refuses a count that does not match
    its features); saved, the files hold what PixtralProcessor's __init__ takes."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    from merging.loading import load_model
    from merging.processors import load_processor

    folder = kits("mistral3")["vlm"]
    model, proc = load_model(folder)
    tok = proc.tokenizer
    layouts = {WIDE: "[IMG] [IMG] [IMG_END]", TALL: "[IMG] [IMG_BREAK] [IMG] [IMG_END]",
               (32, 32): "[IMG] [IMG] [IMG_BREAK] [IMG] [IMG] [IMG_END]"}  # 16 x 16 pixels a token
    texts = ["[INST][IMG]how many circles ?[/INST]"] * len(layouts)
    images = [[Image.new("RGB", s, (200, 30, 30))] for s in layouts]
    enc = proc(images=images, text=texts, return_tensors="pt", add_special_tokens=False, padding=True)
    for ids, mask, want in zip(enc["input_ids"], enc["attention_mask"], layouts.values()):
        got = tok.convert_ids_to_tokens(ids[mask.bool()].tolist())
        assert got == ["[INST]", *want.split(), "how", "many", "circles", "?", "[/INST]"]
    alone = transformers.PixtralImageProcessorPil.from_pretrained(folder)
    pix = alone([im for x in images for im in x], patch_size={"height": 16, "width": 16}, return_tensors="pt")
    assert torch.equal(enc["pixel_values"], pix["pixel_values"])
    with torch.no_grad():
        assert model(**enc).logits.shape[:2] == enc["input_ids"].shape
        short = enc["input_ids"].clone()
        short[0, (short[0] == model.config.image_token_index).nonzero()[0, 0]] = tok.convert_tokens_to_ids("the")
        with pytest.raises(ValueError):
            model(**{**enc, "input_ids": short})
    with pytest.raises(ValueError, match="2 \\[IMG\\] token"):
        proc(images=images[:1], text=["[INST][IMG][IMG]how[/INST]"], return_tensors="pt")
    proc.save_pretrained(tmp_path)
    settings, _ = ProcessorMixin.get_processor_dict(str(tmp_path))
    assert set(settings) - {"processor_class"} <= _init_parameters(
        "transformers.models.pixtral.processing_pixtral", "PixtralProcessor")
    assert settings["processor_class"] == "PixtralProcessor" and settings["chat_template"] == proc.chat_template
    assert (settings["patch_size"], settings["spatial_merge_size"]) == (8, 2)
    assert type(transformers.AutoImageProcessor.from_pretrained(tmp_path)).__name__.startswith("PixtralImageProcessor")
    again = load_processor(tmp_path, "mistral3")(images=images, text=texts, return_tensors="pt", padding=True,
                                                 add_special_tokens=False)
    assert all(torch.equal(again[k], enc[k]) for k in enc)


def test_a_missing_package_or_a_bad_file_is_named_in_one_line(kits, tmp_path):
    """A family the lab has no image-only processor for names the package and who needs it; a bad
    tokenizer file is named as such, never blamed on a missing torchvision."""
    from merging.errors import LabError
    from merging.loading import load_model
    from merging.processors import first_line, load_processor

    if NO_TORCHVISION:
        with pytest.raises(LabError) as e:
            load_processor(kits("qwen2_vl")["vlm"], "some_family")
        assert str(e.value) == ("some_family's processor needs torchvision (Qwen2VLVideoProcessor requires it), "
                                "which is not installed: pip install torchvision (the build made for your torch)")
    for family in ("llava", "qwen2_vl"):
        bad = tmp_path / family
        shutil.copytree(kits(family)["vlm"], bad)
        (bad / "tokenizer.json").write_text("{not json")
        with pytest.raises(LabError) as e:
            load_model(bad)
        msg = str(e.value)
        assert "no usable processor (" in msg and "JSONDecodeError" in msg, msg
        assert "torchvision" not in msg and "\n" not in msg
    assert first_line(ImportError("\nPixtralProcessor requires the Torchvision library\nmore")) == \
        "PixtralProcessor requires the Torchvision library"


def test_a_torchvision_that_does_not_import_is_named_in_one_line(kits, tmp_path):
    """PyPI's torchvision beside the CPU build of torch fails at import ("operator torchvision::nms does
    not exist"), and transformers, which then imports it for every model, says only "Could not import
    module 'LlamaConfig'". Reproduced by an installed package of that name whose import raises the same."""
    site = tmp_path / "site"
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (site / "torchvision-0.28.0.dist-info").mkdir()
    (site / "torchvision-0.28.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\n"
                                                                      "Version: 0.28.0\n")
    env = {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "analysis", "eval", str(kits("llava")["vlm"]), "--suite", "text_math",
                        "--limit", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_line(r, 2, "torchvision is installed but does not import (RuntimeError: operator torchvision::nms does not "
             "exist)", "pip uninstall torchvision, or install the build made for your torch")
