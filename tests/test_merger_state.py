"""The in-place merger owns the model's weights: after any sequence of merges, snapshot loads,
cancels, failures and restores, the live weights are exactly what `merger.current` says, and
restore() gives the checkpoint bit for bit.

References are independent of the merger: the VLM's tensors read from its safetensors file, and
each recipe's merge streamed to disk by merging.engine (tests/test_inplace.py shows the two agree).
Random sequences come from seeded random.Random (always run) and, when installed, hypothesis.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from merging.engine import merge_to_disk
from merging.errors import LabError
from merging.inplace import PARTIAL, InPlaceMerger
from merging.merge_identity import merge_key, triple_fingerprints, weights_id
from merging.recipe import from_dict
from tests.factories import file_tensors, make_tiny_triple
from tests.test_memory_plan import forced_plans

LAYERS = 4
RECIPES = [  # full merges, layer-limited ones, one that merges the embeddings too
    ("linear", {"alpha": 0.9}, {}),
    ("task_arithmetic", {"alpha": 0.5}, {"layers": [0, 1]}),
    ("ties", {"density": 0.5}, {"embeddings": "merge_shared_rows"}),
    ("dare_linear", {"density": 0.5}, {"layers": [2, 3], "seed": 1}),
    ("linear", {"alpha": 0.3}, {"layers": [1, 1]}),
]
OPS = ("apply", "apply", "apply", "snapshot", "snapshot", "snapshot", "restore", "cancel", "error", "interrupt", "bad")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(triple, recipes, reference tensors per merge key and None = the checkpoint, fresh())."""
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("state")
    tri = make_tiny_triple(root, num_layers=LAYERS, layout="new")
    recipes = [from_dict({"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"]),
                          "method": m, "parameters": k, **x}) for m, k, x in RECIPES]
    refs = {None: file_tensors(tri["vlm"])}
    for i, rec in enumerate(recipes):
        merge_to_disk(rec, root / f"m{i}")
        refs[merge_key(rec)] = file_tensors(root / f"m{i}")
    assert len(refs) == len(recipes) + 1  # every recipe has its own key

    plans = forced_plans(tri)

    def fresh(snapshots=2, plan=None):
        model = LlavaForConditionalGeneration.from_pretrained(tri["vlm"]).eval()
        return model, InPlaceMerger(model, str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]),
                                    snapshots=snapshots, plan=plans[plan] if plan else None)

    return tri, recipes, refs, fresh


def live(model) -> dict:
    return dict(model.named_parameters())


def assert_holds(model, ref: dict, what) -> None:
    params = live(model)
    assert sorted(params) == sorted(ref)
    for n, t in ref.items():
        assert torch.equal(params[n].detach(), t), (what, n)


def check(model, merger, refs) -> None:
    """The live weights are what `current` says, and restore() (on a copy, so the sequence goes
    on undisturbed) gives the checkpoint."""
    assert merger.current != PARTIAL
    assert_holds(model, refs[merger.current], merger.current)
    twin_model, twin = copy.deepcopy((model, merger))
    twin.restore()
    assert twin.current is None
    assert_holds(twin_model, refs[None], "restored")


def step(merger, recipes, op: str, i: int, k: int) -> None:
    """One operation on recipe i; k: how many tensors a cancelled / failing merge gets through."""
    rec = recipes[i % len(recipes)]
    if op == "apply":
        merger.apply(rec)
    elif op == "snapshot":
        kept = merge_key(rec) in merger.snapshots()
        assert merger.load_snapshot(merge_key(rec)) == kept
    elif op == "restore":
        merger.restore()
    elif op in ("cancel", "error", "interrupt"):
        # Stopped after k progress steps / cancel checks; a merge with fewer steps just completes.
        exc = {"cancel": LabError, "error": RuntimeError, "interrupt": KeyboardInterrupt}[op]
        calls = []

        def tick(*_):
            calls.append(1)
            if op != "cancel" and len(calls) > k:
                raise exc("boom")
            return len(calls) > k

        kw = {"cancel": tick} if op == "cancel" else {"progress": tick}
        try:
            merger.apply(rec, **kw)
        except exc:
            assert merger.current is None  # stopped: back to the original
        else:
            assert merger.current == merge_key(rec)
    elif op == "bad":  # refused before any tensor is touched: the state is kept as it was
        bad = from_dict({**rec.to_dict(), "method": "linear", "parameters": {"alpha": [0.1] * (LAYERS + 1)}})
        before = merger.current
        with pytest.raises(LabError):
            merger.apply(bad)
        assert merger.current == before


def run_sequence(world, ops: list[tuple[str, int, int]], plan: str | None = None) -> None:
    _, recipes, refs, fresh = world
    model, merger = fresh(plan=plan)
    check(model, merger, refs)
    for op, i, k in ops:
        step(merger, recipes, op, i, k)
        check(model, merger, refs)
    merger.restore()
    assert_holds(model, refs[None], "end")


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_keep_the_original_exact(world, seed):
    rnd = random.Random(seed)
    ops = [(rnd.choice(OPS), rnd.randrange(len(RECIPES)), rnd.randrange(0, 6)) for _ in range(14)]
    run_sequence(world, ops)


@pytest.mark.parametrize("plan", ["mixed", "tight"])
@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_keep_the_original_exact_under_a_large_models_plan(world, plan, seed):
    """The placements a 7B pair gets on a small card (in-place layers with host or file originals,
    kept merges in host RAM or none, inputs on the device, in RAM or in the files) keep the same
    invariants as the roomy one."""
    rnd = random.Random(100 + seed)
    ops = [(rnd.choice(OPS), rnd.randrange(len(RECIPES)), rnd.randrange(0, 6)) for _ in range(14)]
    run_sequence(world, ops, plan)


def test_both_panes_alternate_without_a_re_merge(world):
    """Original, merge, original, merge...: after the first merge every switch is a kept state
    (load_snapshot finds it; nothing is merged again), and each state is exact."""
    _, recipes, refs, fresh = world
    for plan in (None, "mixed"):
        model, merger = fresh(plan=plan)
        merger.apply(recipes[2])
        key = merge_key(recipes[2])
        for _ in range(3):
            merger.restore()
            assert_holds(model, refs[None], "original")
            assert merger.load_snapshot(key), plan
            assert_holds(model, refs[key], "merged")
    _, tight = fresh(plan="tight")  # no room to keep a merge: the caller must merge again
    tight.apply(recipes[2])
    tight.restore()
    assert not tight.load_snapshot(key)


def test_random_sequences_hypothesis(world):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, len(RECIPES) - 1), st.integers(0, 5)),
                   max_size=12)

    @hyp.settings(max_examples=40, deadline=None, database=None, derandomize=True)
    @hyp.given(ops)
    def prop(seq):
        run_sequence(world, seq)

    prop()


def test_layer_limited_merge_after_a_cached_full_merge(world):
    """The reported sequence: full merge, another merge, back to the first from its snapshot,
    then a merge of layers [0, 1]: layers 2-3 (and everything else outside) are the VLM's."""
    _, recipes, refs, fresh = world
    model, merger = fresh()
    merger.apply(recipes[0])
    merger.apply(recipes[2])
    assert merger.load_snapshot(merge_key(recipes[0]))
    assert_holds(model, refs[merge_key(recipes[0])], "snapshot")
    merger.apply(recipes[1])  # layers [0, 1]
    params, original = live(model), refs[None]
    outside = [n for n in original if not any(f"layers.{i}." in n for i in (0, 1))]
    assert any("layers.3." in n for n in outside)
    for n in outside:
        assert torch.equal(params[n].detach(), original[n]), n
    merger.restore()
    assert_holds(model, original, "restored")


def test_snapshots_are_bounded_and_most_recent_first_out(world):
    _, recipes, refs, fresh = world
    model, merger = fresh(snapshots=2)
    for rec in recipes[:3]:
        merger.apply(rec)
    keys = [merge_key(r) for r in recipes[:3]]
    assert merger.snapshots() == keys[1:]
    assert not merger.load_snapshot(keys[0]) and merger.current == keys[2]
    assert merger.load_snapshot(keys[1])
    assert_holds(model, refs[keys[1]], "snapshot")
    _, none = fresh(snapshots=0)
    none.apply(recipes[0])
    assert none.snapshots() == [] and not none.load_snapshot(keys[0])


def test_weights_id_names_the_live_weights(world):
    tri, recipes, _, fresh = world
    model, merger = fresh()
    fps = triple_fingerprints(str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]))
    assert merger.weights_id == weights_id(fps, None) == weights_id({"vlm": fps["vlm"]}, None)
    ids = set()
    for rec in recipes:
        merger.apply(rec)
        assert merger.weights_id == weights_id(fps, merge_key(rec))
        ids.add(merger.weights_id)
    assert len(ids) == len(recipes) and weights_id(fps, None) not in ids
    merger.restore()
    assert merger.weights_id == weights_id(fps, None)


def test_a_recipe_for_another_triple_is_refused(world, tmp_path):
    tri, recipes, refs, fresh = world
    other = make_tiny_triple(tmp_path, num_layers=LAYERS, seed=7, layout="new")
    model, merger = fresh()
    merger.apply(recipes[0])
    rec = from_dict({**recipes[0].to_dict(), "reasoner": str(other["reasoner"])})
    with pytest.raises(LabError, match="reasoner"):
        merger.apply(rec)
    assert merger.current == merge_key(recipes[0])
    assert_holds(model, refs[merge_key(recipes[0])], "kept")
