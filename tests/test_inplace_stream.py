"""The in-place merger's streamed merge on several threads (merging.inplace_stream): small row
blocks so every tensor spans many, bf16 files served in float32. Each merge equals the folder
`merge_to_disk` writes bit for bit, a dropped merge's tensors are written over instead of new ones,
a loaded original that differs from its file is never used for the VLM's rows, and an error in any
block names the first failing block and leaves the original VLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.engine import merge_to_disk
from merging.errors import LabError
from merging.inplace import InPlaceMerger
from merging.recipe import from_dict
from tests.factories import file_tensors, make_tiny_triple

BLOCK = 3 * 32  # three rows of the tiny models' hidden size (tests/factories.py)


@pytest.fixture(scope="module")
def tri(tmp_path_factory):
    return make_tiny_triple(tmp_path_factory.mktemp("stream"), num_layers=2, layout="new", dtype=torch.bfloat16)


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def load(tri):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tri["vlm"], dtype=torch.float32)


def recipe(tri, method="task_arithmetic", **knobs):
    return from_dict({"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"]),
                      "method": method, "parameters": knobs})


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_equals_folder(model, folder):
    sd = state(model)
    for n, t in file_tensors(folder).items():  # the folder is bf16; the model holds it in float32
        assert torch.equal(bits(sd[n]), bits(t.to(sd[n].dtype))), n


@pytest.mark.parametrize("snapshots", [0, 2])
def test_threaded_blocks_equal_the_folder_and_reuse_the_dropped_merge(tri, tmp_path, two_threads, snapshots):
    model = load(tri)
    original = state(model)
    merger = InPlaceMerger(model, str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]), snapshots=snapshots,
                           hold_inputs_below=0)  # the inputs streamed from the files, as for a real model
    merger.block_elems = BLOCK
    p = merger.params["layers.1.mlp.down_proj.weight"]
    seen = []
    for i, (method, knobs) in enumerate([("task_arithmetic", {"alpha": 0.5}), ("task_arithmetic", {"alpha": 0.6}),
                                         ("linear", {"alpha": 0.3}), ("task_arithmetic", {"alpha": 0.6})]):
        rec = recipe(tri, method, **knobs)
        merger.apply(rec)
        merge_to_disk(rec, tmp_path / f"m{i}", block_elems=BLOCK)
        assert_equals_folder(model, tmp_path / f"m{i}")
        report = json.loads((tmp_path / f"m{i}" / "merge_report.json").read_text())
        got = merger.diagnostics.report["relative_change"]
        assert got.keys() == report["relative_change"].keys()
        assert list(got.values()) == pytest.approx(list(report["relative_change"].values()), rel=1e-9)
        seen.append(p.data_ptr())
    # the merge a new one replaces is written over: the last one (none kept), or the older of two kept
    if snapshots == 0:
        assert seen == [seen[0]] * 4
    else:
        assert seen == [seen[0], seen[1]] * 2 and seen[0] != seen[1]
    assert merger.original["layers.1.mlp.down_proj.weight"].data_ptr() not in seen
    merger.restore()
    assert all(torch.equal(bits(original[n]), bits(q)) for n, q in model.named_parameters())


def test_a_loaded_original_that_differs_from_its_file_is_not_used(tri, tmp_path, two_threads):
    """A model class may change a weight while loading: the VLM's rows then come from the file,
    as in the folder, on every merge (the first merge finds the difference)."""
    model = load(tri)
    merger = InPlaceMerger(model, str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]), hold_inputs_below=0)
    merger.block_elems = BLOCK
    c = "layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        merger.params[c][-1, -1] += 1.0  # the last block only: the earlier ones match
    for alpha in (0.4, 0.9):
        rec = recipe(tri, alpha=alpha)
        merger.apply(rec)
        merge_to_disk(rec, tmp_path / f"a{alpha}", block_elems=BLOCK)
        sd, disk = state(model), file_tensors(tmp_path / f"a{alpha}")
        name = next(n for n, q in model.named_parameters() if q is merger.params[c])
        assert torch.equal(sd[name], disk[name].float())


def test_the_first_failing_block_is_named_and_the_original_restored(tri, tmp_path, two_threads):
    bad = make_tiny_triple(tmp_path / "bad", num_layers=2, layout="new", dtype=torch.bfloat16)
    name = "model.layers.1.mlp.up_proj.weight"
    for role, sign in (("reasoner", 1.0), ("base", -1.0)):  # r - b overflows to Inf in rows 7 and 40 only
        f = bad[role] / "model.safetensors"
        sd = load_file(f)
        sd[name][7, 5] = sd[name][40, 2] = sign * 3e38
        save_file(sd, f, metadata={"format": "pt"})
    model = load(bad)
    original = state(model)
    merger = InPlaceMerger(model, str(bad["vlm"]), str(bad["reasoner"]), str(bad["base"]), hold_inputs_below=0)
    merger.block_elems = BLOCK
    with pytest.raises(LabError, match=r"layers\.1\.mlp\.up_proj\.weight overflowed to Inf \(rows 6-8\)"):
        merger.apply(recipe(bad, alpha=1.0))
    assert merger.current is None
    assert all(torch.equal(bits(original[n]), bits(q)) for n, q in model.named_parameters())
