"""Merging in place equals the streamed folder, tensor for tensor; restore and re-apply."""

from __future__ import annotations

import pytest
import torch

from merging.engine import merge_to_disk
from merging.errors import LabError
from merging.inplace import InPlaceMerger, map_parameters
from merging.recipe import from_dict
from tests.factories import file_tensors, make_tiny_triple

CASES = [
    ("linear", {"alpha": [0.1, 0.6]}, {}),
    ("task_arithmetic", {"alpha": 0.7}, {"layers": [1, 1]}),
    ("ties", {"density": 0.3, "alpha": [0.5, 1.0, 1.5]}, {}),
    ("dare_ties", {"density": 0.4}, {"seed": 3}),
    ("dare_linear", {"density": 0.6, "normalize": 1}, {"seed": 5, "embeddings": "merge_shared_rows"}),
    ("layer_swap", {"base_layer_num": 0, "alpha": 0.4}, {}),
    ("ip_merging", {"threshold": 0.0, "top_fraction": 0.0, "rank": 8}, {}),
    ("frank", {"use_prior": 1, "beta": 0.3}, {}),
    ("frank", {"w_v": [0.9, 0.2, 0.5]}, {}),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("ip")
    tri = make_tiny_triple(root, num_layers=3, layout="new")
    model = LlavaForConditionalGeneration.from_pretrained(tri["vlm"])
    merger = InPlaceMerger.from_recipe(model, recipe(tri, "ties", {}, {}))
    return tri, model, merger, root


def recipe(tri, method, knobs, extra):
    return from_dict({"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"]),
                      "method": method, "parameters": knobs, **extra})


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_parameter_mapping_is_derived(setup):
    _, model, merger, _ = setup
    names = {c: n for c, n in map_parameters(model, {c: tuple(p.shape) for c, p in merger.params.items()}).items()}
    assert names["layers.0.self_attn.q_proj.weight"] == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert names["lm_head.weight"] == "lm_head.weight" and names["norm.weight"] == "model.language_model.norm.weight"


@pytest.mark.parametrize("i", range(len(CASES)))
def test_inplace_equals_streaming(setup, i):
    tri, model, merger, root = setup
    method, knobs, extra = CASES[i]
    rec = recipe(tri, method, knobs, extra)
    out = root / f"out{i}"
    merge_to_disk(rec, out)
    before = state(model)
    merger.apply(recipe(tri, *CASES[(i + 1) % len(CASES)]))  # a different merge first
    merger.apply(rec)  # must start from the originals, not from the previous merge
    disk = file_tensors(out)
    sd = state(model)
    assert sorted(disk) == sorted(sd)
    for n, t in disk.items():
        assert torch.equal(sd[n], t), n
    assert any(not torch.equal(before[n], sd[n]) for n in sd)
    merger.restore()
    assert all(torch.equal(before[n], p) for n, p in state(model).items())


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_streaming_in_row_blocks_equals_whole_tensors(setup, method):
    """Elementwise methods stream each tensor a block of rows at a time; with blocks of 3 rows
    (partial last blocks, vocabulary rows only the VLM has) the folder equals the in-place merge."""
    tri, model, merger, root = setup
    rec = recipe(tri, method, {"alpha": [0.3, 0.9]}, {"embeddings": "merge_shared_rows"})
    merge_to_disk(rec, root / f"rows-{method}", block_elems=3 * 64)
    merger.apply(rec)
    disk, sd = file_tensors(root / f"rows-{method}"), state(model)
    assert all(torch.equal(sd[n], t) for n, t in disk.items())
    merger.restore()


def test_cancel_and_error_restore(setup):
    tri, model, merger, _ = setup
    before = state(model)
    calls = []
    with pytest.raises(LabError, match="cancelled"):
        merger.apply(recipe(tri, "ties", {}, {}), cancel=lambda: calls.append(1) or len(calls) > 4)
    assert all(torch.equal(before[n], p) for n, p in state(model).items())

    def boom(done, total, msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merger.apply(recipe(tri, "linear", {}, {}), progress=boom)
    assert all(torch.equal(before[n], p) for n, p in state(model).items())
    with pytest.raises(LabError, match="list of length 4"):
        merger.apply(recipe(tri, "linear", {"alpha": [0.1, 0.2, 0.3, 0.4]}, {}))
