"""The VLM -> text-LLM name mapping, for every covered family, in both on-disk layouts."""

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.checkpoint import Checkpoint
from merging.errors import LabError
from merging.layout import derive_layout, split_canonical
from tests.factories import rename_keys
from tests.families import BUILDERS, NEW_LAYOUT_RULES, build

NON_LM = re.compile(r"vision|visual|projector|connector|image_newline")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> {"old": folder, "new": folder, "llm": text-LLM folder}."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in BUILDERS:
        vlm, llm = build(fam)
        old, new, txt = root / fam / "old", root / fam / "new", root / fam / "llm"
        vlm.save_pretrained(old)
        llm.save_pretrained(txt)
        shutil.copytree(old, new)
        rename_keys(new, NEW_LAYOUT_RULES[fam])
        out[fam] = {"old": old, "new": new, "llm": txt}
    return out


@pytest.mark.parametrize("family", list(BUILDERS))
def test_mapping_covers_lm_exactly_once_and_agrees_across_layouts(saved, family):
    with Checkpoint.open(saved[family]["llm"]) as ck:
        llm = derive_layout(ck)
        assert llm.family != "inferred" and not llm.is_vlm
    per_layout = {}
    for layout in ("old", "new"):
        with Checkpoint.open(saved[family][layout]) as ck:
            lay = derive_layout(ck)
            names = ck.names()
            assert lay.family == family and lay.is_vlm
            assert lay.num_layers == 2 and lay.hidden_size == 32 and lay.vocab_size == 128
            # The same canonical names as the plain text LLM of the VLM's own text config.
            assert set(lay.lm) == set(llm.lm)
            # Every tensor is either LM (exactly once) or untouched; nothing vision-like is LM.
            actual = list(lay.lm.values())
            assert len(actual) == len(set(actual))
            assert sorted(actual + lay.other) == sorted(names)
            assert not [a for a in actual if NON_LM.search(a)]
            assert all(NON_LM.search(n) for n in lay.other), [n for n in lay.other if not NON_LM.search(n)]
            per_layout[layout] = {c: ck.get(a) for c, a in lay.lm.items()}
    for c, t in per_layout["old"].items():
        assert torch.equal(t, per_layout["new"][c]), c


def test_layouts_really_differ_for_llava_and_qwen(saved):
    for fam in ("llava", "qwen2_vl"):
        with Checkpoint.open(saved[fam]["old"]) as a, Checkpoint.open(saved[fam]["new"]) as b:
            assert derive_layout(a).prefix != derive_layout(b).prefix


def test_split_canonical():
    assert split_canonical("layers.3.mlp.up_proj.weight") == (3, "mlp.up_proj.weight")
    assert split_canonical("norm.weight") == (None, "norm.weight")
    assert split_canonical("lm_head.weight") == (None, "lm_head.weight")


def _rewrite_config(folder, **changes):
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_family_is_inferred_with_a_warning(saved, tmp_path):
    folder = tmp_path / "mystery"
    shutil.copytree(saved["llava"]["old"], folder)
    rename_keys(folder, [(r"^language_model\.model\.", "backbone.decoder."), (r"^vision_tower\.", "eye.vision_encoder.")])
    _rewrite_config(folder, model_type="mystery_vlm", architectures=["MysteryForVision"])
    with Checkpoint.open(folder) as ck, Checkpoint.open(saved["llava"]["old"]) as ref:
        lay, want = derive_layout(ck), derive_layout(ref)
    assert lay.family == "inferred" and lay.prefix == "backbone.decoder."
    assert set(lay.lm) == set(want.lm)
    assert lay.warnings and "backbone.decoder." in lay.warnings[0] and "2 layers" in lay.warnings[0]
    assert not [a for a in lay.lm.values() if "vision" in a]


def test_unknown_architecture_without_layers_is_refused(tmp_path):
    folder = tmp_path / "blob"
    folder.mkdir()
    save_file({"encoder.w": torch.zeros(2, 2), "head.b": torch.zeros(2)}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "blob"}')
    with Checkpoint.open(folder) as ck, pytest.raises(LabError, match="no layer-indexed tensors"):
        derive_layout(ck)


def test_declared_family_without_its_layers_is_refused(saved, tmp_path):
    folder = tmp_path / "wrong"
    shutil.copytree(saved["llava"]["old"], folder)
    sd = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers" not in k or "vision" in k}, folder / "model.safetensors")
    with Checkpoint.open(folder) as ck, pytest.raises(LabError, match="no decoder layers"):
        derive_layout(ck)
