"""The worker's memory plan: what it places where, checked against sizes computed independently
(safetensors' own reader, and a hand count of a Qwen2 layer's parameters)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from merging import memory_plan as mp
from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.errors import LabError
from tests.factories import make_tiny_triple

GiB = 2**30


@pytest.fixture(scope="module")
def tri(tmp_path_factory):
    return make_tiny_triple(tmp_path_factory.mktemp("plan"), num_layers=3, layout="new")


def _bytes_by_safetensors(folder, keep=lambda name: True, itemsize=None) -> int:
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            names = sf.keys()
            for n in names:
                if keep(n):
                    t = sf.get_tensor(n)
                    total += t.numel() * (itemsize or t.element_size())
    return total


def footprint(tri, itemsize=None):
    rep = check_triple(str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]))
    with Checkpoint.open(tri["vlm"]) as v, Checkpoint.open(tri["reasoner"]) as r, Checkpoint.open(tri["base"]) as b:
        return mp.footprint_of(v, rep.layouts, r, b, itemsize)


def test_footprint_counts_every_byte_once(tri):
    fp = footprint(tri, itemsize=4)
    assert fp.live == _bytes_by_safetensors(tri["vlm"], itemsize=4)
    lm = lambda n: ".language_model." in n or n.startswith("lm_head")  # noqa: E731
    assert sum(u.original for u in fp.units) == _bytes_by_safetensors(tri["vlm"], lm)
    assert sum(u.inputs for u in fp.units) == (_bytes_by_safetensors(tri["reasoner"])
                                               + _bytes_by_safetensors(tri["base"]))
    assert [u.layer for u in fp.units] == [0, 1, 2, -1, -2]
    layer1 = _bytes_by_safetensors(tri["vlm"], lambda n: ".layers.1." in n)
    assert fp.units[1].original == layer1


def test_7b_shape_matches_a_hand_count():
    fp = mp.footprint_of_shape(**mp.QWEN2_VL_7B)
    # Qwen2-7B: 7.62 B parameters with its untied head; plus the vision tower, in bf16.
    lm_params = 28 * (2 * 3584**2 + 2 * 512 * 3584 + 3 * 3584 * 18944 + 2 * 3584 + 3584 + 2 * 512) \
        + 2 * 152064 * 3584 + 3584
    assert abs(lm_params - 7.6e9) < 0.05e9
    assert fp.live == 2 * (lm_params + 675_000_000)
    assert sum(u.original for u in fp.units) == 2 * lm_params


@pytest.mark.parametrize("gpu,host", [(24, 48), (48, 48), (80, 48), (80, 16)])
def test_a_7b_pair_fits_the_cards_users_bring(gpu, host):
    p = mp.plan_7b(gpu, host)
    assert p.fits and p.instant_swap, p.lines()
    assert p.use["device"] <= gpu * GiB - mp.CUDA_CONTEXT
    assert p.use["host"] <= host * GiB
    # Pointer units come first and in layer order: the layers kept on the device are a prefix.
    dec = [x for x in p.placements if x.layer >= 0]
    flags = [x.merged == "device" for x in dec]
    assert flags == sorted(flags, reverse=True)


def test_a_bigger_card_keeps_more_on_it():
    small, big = mp.plan_7b(24, 48), mp.plan_7b(48, 48)
    count = lambda p, what: sum(1 for x in p.placements if getattr(x, what) == "device")  # noqa: E731
    assert count(big, "merged") > count(small, "merged")
    assert big.use["host"] < small.use["host"]


def test_a_model_larger_than_the_card_is_refused_with_what_to_free():
    p = mp.plan_7b(12, 48)
    assert not p.fits
    assert "free" in p.problem and "GiB" in p.problem and "\n" not in p.problem
    assert p.lines() == [p.problem]


def test_cpu_plan_is_one_pool_and_reads_inputs_from_the_files(tri):
    fp = footprint(tri, itemsize=4)
    changed = sum(u.changed for u in fp.units)
    roomy = mp.plan(fp, "cpu", 0, fp.live + 10 * changed, headroom=0, hold_inputs_below=0)
    assert roomy.fits and all(x.merged == "device" and x.inputs == "file" for x in roomy.placements)
    assert roomy.use["device"] == 0 and roomy.use["host"] == fp.live + changed * roomy.sets
    inputs = sum(u.inputs for u in fp.units)  # all of them small: held, where there is room
    held = mp.plan(fp, "cpu", 0, fp.live + 10 * changed + inputs, headroom=0, hold_inputs_below=inputs + 1)
    assert all(x.inputs == "device" for x in held.placements)
    assert held.use["host"] == fp.live + changed * held.sets + inputs
    none = mp.plan(fp, "cpu", 0, fp.live, headroom=0)  # not a byte to spare
    assert none.fits and not none.instant_swap
    assert all(x.merged == "in-place" and x.original == "file" and x.stash == "none" for x in none.placements)
    refused = mp.plan(fp, "cpu", 0, fp.live - 1, headroom=0)
    assert not refused.fits


def forced_plans(tri) -> dict:
    """Plans for the tiny triple as a large model would get them on small machines: a GPU-style
    plan (device and host apart: pointer layers 0-1 and the norm, in-place layer 2 and vocabulary
    with host copies, inputs on the device, in host RAM and in the files), one without a byte to
    spare (originals re-read from the files, no kept merge), and the roomy default."""
    fp = footprint(tri, itemsize=4)
    by = {u.layer: u for u in fp.units}
    copied = by[2].original + by[-2].original  # the in-place units' originals, and as much again for their stash
    dev = fp.live + by[0].changed + by[1].changed + by[-1].changed + by[-1].inputs + 100
    host = GiB + 2 * copied + by[0].inputs + by[1].inputs
    return {"mixed": mp.plan(fp, "cuda", dev, host, headroom=0, max_sets=2),
            "tight": mp.plan(fp, "cpu", 0, fp.live, headroom=0),
            "roomy": mp.plan(fp, "cpu", 0, fp.live + GiB, headroom=0)}


def test_the_forced_plans_cover_every_placement(tri):
    seen = {(w, getattr(x, w)) for p in forced_plans(tri).values() for x in p.placements
            for w in ("merged", "original", "stash", "inputs")}
    assert seen == {("merged", "device"), ("merged", "in-place"), ("original", "loaded"), ("original", "host"),
                    ("original", "file"), ("stash", "device"), ("stash", "host"), ("stash", "none"),
                    ("inputs", "device"), ("inputs", "host"), ("inputs", "file")}


def test_the_merger_refuses_a_plan_that_does_not_fit(tri):
    from transformers import LlavaForConditionalGeneration

    from merging.inplace import InPlaceMerger

    fp = footprint(tri, itemsize=4)
    model = LlavaForConditionalGeneration.from_pretrained(tri["vlm"], dtype=torch.float32)
    with pytest.raises(LabError, match="free"):
        InPlaceMerger(model, str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]),
                      plan=mp.plan(fp, "cpu", 0, fp.live // 2, headroom=0))


def test_extra_merged_states_only_for_small_models(tri):
    """A set is every merged layer: above EXTRA_SET_MAX_BYTES a slider position is not kept (one
    set for the two panes), below it up to MAX_SETS are."""
    assert mp.plan_7b(80, 48).sets == 1
    fp = footprint(tri, itemsize=4)
    assert sum(u.changed for u in fp.units) < mp.EXTRA_SET_MAX_BYTES
    assert mp.plan(fp, "cpu", 0, fp.live + GiB, headroom=0).sets == mp.MAX_SETS


def test_held_inputs_are_the_reasoner_and_base_bytes_the_plan_keeps(tri):
    """What the merger can let go of while frism learns: every byte of the reasoner's and base's files when
    the plan holds them (small inputs), nothing when it reads them from the files."""
    held = mp.plan_triple(str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]), "cpu", 4)
    assert held.held_inputs() == _bytes_by_safetensors(tri["reasoner"]) + _bytes_by_safetensors(tri["base"])
    files = mp.plan_triple(str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]), "cpu", 4, hold_inputs_below=0)
    assert {p.inputs for p in files.placements} == {"file"} and files.held_inputs() == 0
