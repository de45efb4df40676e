"""FRISM: gated subspaces of the reasoner's task vector, gates learned on perception prompts (the
toy family's smoke build), the merge against an independent SVD, cancel, recipe and CLI."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import yaml
from PIL import Image

from merging import gate_learning, gate_memory, methods, subspace_gates
from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.engine import merge_to_disk
from merging.errors import Cancelled, LabError
from merging.finetune import build_batch
from merging.inplace import InPlaceMerger
from merging.layout import derive_layout
from merging.loading import load_model
from merging.merge_identity import merge_key
from merging.methods import MergeContext, TensorSet
from merging.recipe import from_dict, load
from tests.factories import make_tiny_triple
from tests.paths import ENV, ROOT, TOY

FRISM = methods.get("frism")


@pytest.fixture(scope="module")
def tri(tmp_path_factory):
    return make_tiny_triple(tmp_path_factory.mktemp("tri"), num_layers=2)


def recipe(folders, **knobs):
    return from_dict({"vlm": str(folders["vlm"]), "reasoner": str(folders["reasoner"]), "base": str(folders["base"]),
                      "method": "frism", "parameters": knobs})


def family(smoke_family) -> dict:
    root, _ = smoke_family
    return {"vlm": root / "vlm", "reasoner": root / "math", "base": root / "base"}


def lm(folder) -> dict[str, torch.Tensor]:
    with Checkpoint.open(folder) as ck:
        return {c: ck.get(a) for c, a in derive_layout(ck).lm.items()}


def svd_merge(v, r, b, rank, groups, gates):
    """The documented form from torch.linalg.svd: W_v + sum_i g_i U_i S_i V_i^T + g_tail (tau - U_k S_k V_k^T)."""
    tau = (r - b).double()
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    k = min(rank, len(s))
    out = v.double().clone()
    for g, idx in zip(gates, torch.tensor_split(torch.arange(k), min(groups, k))):
        out += g * (u[:, idx] * s[idx]) @ vh[idx]
    if k < len(s):
        out += gates[-1] * (tau - (u[:, :k] * s[:k]) @ vh[:k])
    return out.float()


def merged_layer(sets, gates_of, rank, groups):
    ctx = MergeContext(num_layers=1)
    ctx.diagnostics.methods["frism"] = {"learned": {**asdict(gate_learning.Learned()), "gates": gates_of}, "layers": {}}
    out = FRISM.merge_layer(0, sets, {"rank": rank, "groups": groups}, ctx)
    return out, ctx


def random_sets(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layers.0.{n}.weight": TensorSet(f"layers.0.{n}.weight", 0, *(torch.randn(*s, generator=g) for _ in range(3)))
            for n, s in shapes.items()}


def test_pieces_cut_the_top_directions_into_groups_and_keep_the_tail():
    tau = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    p = subspace_gates.pieces(tau, rank=6, groups=4)
    assert [v.shape for v in p.vs] == [(20, 2), (20, 2), (20, 1), (20, 1)] and p.tail and p.gates == 5
    s2 = torch.linalg.svdvals(tau.double()).square()
    want = [s2[0:2].sum(), s2[2:4].sum(), s2[4], s2[5], s2[6:].sum()]
    assert p.energy == pytest.approx([float(x) for x in want], rel=1e-5)
    full = subspace_gates.pieces(tau, rank=50, groups=3)  # rank past the matrix's: no tail
    assert not full.tail and full.gates == 3 and sum(v.shape[1] for v in full.vs) == 12


@pytest.mark.parametrize("rank,groups", [(5, 2), (16, 4), (3, 8)])
def test_gates_scale_the_singular_subspaces_as_an_independent_svd_says(rank, groups):
    sets = random_sets({"mlp.up_proj": (24, 16), "self_attn.o_proj": (16, 16), "input_layernorm": (16,)})
    counts = {n: subspace_gates.pieces((t.reasoner - t.base), rank, groups).gates
              for n, t in sets.items() if t.vlm.dim() == 2}
    g = torch.Generator().manual_seed(2)
    gates = {n: torch.rand(k, generator=g).tolist() for n, k in counts.items()}
    out, ctx = merged_layer(sets, gates, rank, groups)
    assert set(out) == set(counts)  # the 1-D norm keeps the VLM's
    for n, t in out.items():
        s = sets[n]
        torch.testing.assert_close(t, svd_merge(s.vlm, s.reasoner, s.base, rank, groups, gates[n]), atol=1e-4, rtol=1e-4)
    shown = ctx.diagnostics.methods["frism"]["layers"][0]
    assert {k: len(v) for k, v in shown.items()} == {"mlp.up_proj": counts["layers.0.mlp.up_proj.weight"],
                                                      "self_attn.o_proj": counts["layers.0.self_attn.o_proj.weight"]}


@pytest.mark.parametrize("rank", [4, 64])  # with a tail gate, and every direction in the groups
def test_every_gate_one_is_task_arithmetic_alpha_one(rank):
    sets = random_sets({"mlp.down_proj": (16, 24), "self_attn.q_proj": (16, 16)}, seed=3)
    gates = {n: [1.0] * subspace_gates.pieces(t.reasoner - t.base, rank, 4).gates for n, t in sets.items()}
    out, _ = merged_layer(sets, gates, rank, 4)
    for n, t in sets.items():
        torch.testing.assert_close(out[n], t.vlm + (t.reasoner - t.base), atol=1e-5, rtol=1e-5)


def test_every_gate_zero_is_the_vlm_bit_for_bit(tri, tmp_path):
    sets = random_sets({"mlp.up_proj": (24, 16)}, seed=4)
    gates = {n: [0.0] * subspace_gates.pieces(t.reasoner - t.base, 8, 4).gates for n, t in sets.items()}
    out, _ = merged_layer(sets, gates, 8, 4)
    assert out == {}  # nothing merged: the engine writes the VLM's own bits
    merge_to_disk(recipe(tri, steps=0), tmp_path / "half")  # and steps 0 is every gate 0.5 everywhere
    got, v, r, b = lm(tmp_path / "half"), lm(tri["vlm"]), lm(tri["reasoner"]), lm(tri["base"])
    for c in got:
        want = v[c] + 0.5 * (r[c] - b[c]) if c.startswith("layers.") and v[c].dim() == 2 else v[c]
        torch.testing.assert_close(got[c], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank,groups", [(6, 3), (40, 4)])  # with a tail gate; every direction in groups
def test_the_gates_gradient_equals_autograd_of_the_documented_form(rank, groups):
    """Learning's gradient (built from rank-r products, no piece materialised) against float64 autograd
    through W_v + sum_i g_i U_i S_i V_i^T + g_tail (tau - U_k S_k V_k^T) from torch.linalg.svd."""
    g0 = torch.Generator().manual_seed(7)
    tau, upstream = torch.randn(24, 40, generator=g0), torch.randn(24, 40, generator=g0)
    p = subspace_gates.pieces(tau, rank, groups)
    gates = torch.rand(p.gates, generator=g0, requires_grad=True)
    (subspace_gates.delta(tau, p, gates) * upstream).sum().backward()
    ref = gates.detach().double().requires_grad_(True)
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    k = min(rank, len(s))
    form = sum(ref[i] * (u[:, idx] * s[idx]) @ vh[idx] for i, idx in enumerate(torch.tensor_split(torch.arange(k),
                                                                                                   min(groups, k))))
    if p.tail:
        form = form + ref[-1] * (tau.double() - (u[:, :k] * s[:k]) @ vh[:k])
    (form * upstream.double()).sum().backward()
    torch.testing.assert_close(gates.grad.double(), ref.grad, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # and the value is the plain one
        torch.testing.assert_close(subspace_gates.delta(tau, p, gates.detach().tolist()).double(), form.detach(),
                                   atol=1e-4, rtol=1e-4)


def test_the_kl_reads_the_answer_positions_alone(smoke_family):
    """Logits kept at the answer positions only give the log-probabilities of the full logits' answer rows."""
    fam = family(smoke_family)
    vlm, proc = load_model(fam["vlm"])
    prompts = gate_learning.perception_prompts(3, 1)
    batch = build_batch(proc, [(img, q, a) for (img, q), a in zip(prompts, ["2", "red circle", "3"])])
    labels = batch.pop("labels")
    with torch.no_grad():
        full = vlm(**batch).logits
        kept = gate_learning.kept_logits(vlm, batch, labels)
    want = torch.log_softmax(full[:, :-1][labels[:, 1:] != -100].float(), -1)
    assert kept.shape[1] < full.shape[1]
    torch.testing.assert_close(gate_learning.answer_logp(kept, labels), want, atol=1e-5, rtol=1e-5)


def kl_to_vlm(folder, vlm, proc, batch) -> float:
    """KL(VLM || merged) per answer token, from two plain forwards (not the learner's code)."""
    merged, _ = load_model(folder)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        p = torch.log_softmax(vlm(**inputs).logits[:, :-1], -1)
        q = torch.log_softmax(merged(**inputs).logits[:, :-1], -1)
    mask = labels[:, 1:] != -100
    return float((p.exp() * (p - q)).sum(-1)[mask].mean())


def test_learned_gates_lower_the_kl_and_the_reward_raises_them(smoke_family, tmp_path):
    fam = family(smoke_family)
    merge_to_disk(recipe(fam, steps=0), tmp_path / "init")
    merge_to_disk(recipe(fam, beta=0.0, steps=8, examples=8), tmp_path / "kl")
    merge_to_disk(recipe(fam, beta=10.0, steps=4, examples=8), tmp_path / "reward")
    vlm, proc = load_model(fam["vlm"])
    prompts = gate_learning.perception_prompts(8, 0)  # the prompts learning saw, the VLM's own answers
    answers = gate_learning.vlm_answers(vlm, proc, prompts)
    batch = build_batch(proc, [(img, q, a) for (img, q), a in zip(prompts, answers)])
    assert kl_to_vlm(tmp_path / "kl", vlm, proc, batch) < kl_to_vlm(tmp_path / "init", vlm, proc, batch)
    mean = {k: json.loads((tmp_path / k / "merge_report.json").read_text())["diagnostics"]["frism"]["mean_gate"]
            for k in ("init", "kl", "reward")}
    assert mean["init"] == pytest.approx(0.5)
    assert mean["kl"] < 0.5 < mean["reward"]


def test_gates_are_in_the_merge_report_and_in_place_gives_the_same_tensors(smoke_family, tmp_path):
    fam = family(smoke_family)
    rec = recipe(fam, steps=5, examples=8, rank=4, groups=2)
    model, _ = load_model(fam["vlm"])
    merger = InPlaceMerger(model, str(fam["vlm"]), str(fam["reasoner"]), str(fam["base"]))
    merger.apply(from_dict({**rec.to_dict(), "method": "task_arithmetic", "parameters": {"alpha": 0.5}}))
    held = len(merger.cache)  # the small family's inputs, kept in RAM by the plan
    during = []

    def progress(done, total, msg):
        if msg.startswith("frism gates: step"):
            during.append(len(merger.cache))

    extra = merger.apply(rec, progress)  # learns (apply runs under no_grad), then the disk merge reuses the gates
    assert not extra["frism"]["learned"]["cached"]
    # learning ran with the merger's copies of the inputs let go (a second VLM needs the room); they came back
    assert held > 0 and during and set(during) == {0} and len(merger.cache) == held
    merge_to_disk(rec, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())["diagnostics"]["frism"]
    assert report["cached"]
    layers = lm(fam["vlm"])
    matrices = {c for c, t in layers.items() if c.startswith("layers.") and t.dim() == 2}
    assert sum(len(m) for m in report["gates"].values()) == len(matrices)
    assert all(len(g) == 3 and all(0 < x < 1 for x in g) for m in report["gates"].values() for g in m.values())
    assert report["learned"] and len(report["losses"]) == 5 and report["seconds"] > 0
    shares = [x for m in report["spectral_share"].values() for x in m.values()]
    assert len(shares) == len(matrices) and all(len(x) == 3 and sum(x) == pytest.approx(1) for x in shares)
    assert extra["report"]["diagnostics"]["frism"]["gates"] == report["gates"]
    disk = lm(tmp_path / "out")
    for c, p in merger.params.items():
        torch.testing.assert_close(p.detach(), disk[c], atol=1e-6, rtol=1e-6)


def test_cancel_stops_learning_and_writes_nothing(smoke_family, tmp_path):
    fam = family(smoke_family)
    seen = []
    with pytest.raises(Cancelled):
        merge_to_disk(recipe(fam, steps=50, examples=8, beta=0.3), tmp_path / "out",
                      progress=lambda d, t, m: seen.append(m), cancel=lambda: len(seen) >= 2)
    assert not (tmp_path / "out").exists() and len(seen) == 2 and seen[-1].startswith("frism gates: step 2/50")
    model, _ = load_model(fam["vlm"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merger = InPlaceMerger(model, str(fam["vlm"]), str(fam["reasoner"]), str(fam["base"]))
    with pytest.raises(Cancelled):
        merger.apply(recipe(fam, steps=50, examples=8, beta=0.4), cancel=lambda: True)
    assert merger.current is None and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_learning_needs_the_toy_family_unless_steps_is_zero(tri, tmp_path):
    with pytest.raises(LabError, match="steps: 0"):
        merge_to_disk(recipe(tri), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompts_are_not_eval_items():
    digests = set()
    for line in (TOY / "eval" / "perception.jsonl").read_text().splitlines():
        with Image.open(TOY / "eval" / json.loads(line)["image"]) as im:
            digests.add(hashlib.sha256(im.convert("RGB").tobytes()).hexdigest())
    prompts = gate_learning.perception_prompts(64, 0)
    assert not {hashlib.sha256(img.tobytes()).hexdigest() for img, _ in prompts} & digests


def test_recipe_round_trip_and_cli(tri, tmp_path):
    rec = recipe(tri, rank=8, groups=2, beta=0.5, steps=0, examples=4)
    again = from_dict(yaml.safe_load(rec.to_yaml()))
    assert again == rec and again.knobs()["groups"] == 2
    (tmp_path / "r.yaml").write_text(rec.to_yaml())
    r = subprocess.run([sys.executable, "-m", "merging", "merge", str(tmp_path / "r.yaml"), str(tmp_path / "o")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "frism: every gate 0.50 (nothing learned)" in r.stdout
    assert load(tmp_path / "o" / "recipe.yaml") == rec
    gates = json.loads((tmp_path / "o" / "merge_report.json").read_text())["diagnostics"]["frism"]["gates"]
    assert set(gates) == {"0", "1"} and all(len(g) == 3 for m in gates.values() for g in m.values())


def test_the_reports_figure_shows_every_gate_by_layer_matrix_and_subspace():
    """The merge report's figure: the change bars, then a heatmap holding exactly the report's gates (rows
    the layers, columns each matrix's pieces, the tail last); a report of another method has the bars only."""
    from analysis.figures import merge_report_figure

    gates = {"0": {"self_attn.q_proj": [0.1, 0.2, 0.3], "mlp.up_proj": [0.9, 0.8, 0.7]},
             "1": {"self_attn.q_proj": [0.4, 0.5, 0.6], "mlp.up_proj": [0.0, 1.0, 0.5]}}
    shares = {k: {m: [0.5, 0.3, 0.2] for m in v} for k, v in gates.items()}
    report = {"method": "frism", "relative_change": {"0": 0.01, "1": 0.02},
              "diagnostics": {"frism": {"gates": gates, "spectral_share": shares, "mean_gate_per_layer": {}}}}
    fig = merge_report_figure(report)
    bars, heat = fig.data
    assert bars.type == "bar" and heat.type == "heatmap"
    assert list(heat.y) == ["layer 0", "layer 1"]
    assert list(heat.x) == ["q·1", "q·2", "q·t", "up·1", "up·2", "up·t"]
    for r, layer in enumerate(("0", "1")):
        assert [v for v in heat.z[r]] == gates[layer]["self_attn.q_proj"] + gates[layer]["mlp.up_proj"]
    assert heat.hovertext[0][1] == "layer 0, self_attn.q_proj top group 2: gate 0.20, 30% of tau_r's energy"
    plain = merge_report_figure({"method": "task_arithmetic", "relative_change": {"0": 0.01}, "diagnostics": {}})
    assert [t.type for t in plain.data] == ["bar"]


def _prompts_file(folder, n: int = 8, shade: int = 0):
    """A prompts JSONL of n coloured 32x32 images and a question each (answers are never read)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (32, 32), ((40 * i + shade) % 256, 90, 200)).save(folder / f"p{i}.png")
        lines.append(json.dumps({"question": "how many circles are there ?", "answer": "-", "image": f"p{i}.png"}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "prompts.jsonl"


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_another_vlm_learns_its_gates_from_a_prompts_file(kind, tmp_path, monkeypatch):
    """A real-architecture VLM of another family: refused without prompts (steps > 0), learns from the
    recipe's prompts file, and a changed image in that file is another merge and another learning."""
    from tests.family_kits import build

    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path / "cache"))
    fam = build(kind, tmp_path / "fam")
    d = {"vlm": str(fam["vlm"]), "reasoner": str(fam["reasoner"]), "base": str(fam["base"]), "method": "frism",
         "parameters": {"steps": 4, "examples": 8, "rank": 4, "groups": 2, "beta": 0.0}}
    with pytest.raises(LabError, match="prompts: FILE.jsonl"):
        merge_to_disk(from_dict(d), tmp_path / "refused")
    file = _prompts_file(tmp_path / "p")
    rec = from_dict({**d, "prompts": str(file)})
    merge_to_disk(rec, tmp_path / "out")
    got = json.loads((tmp_path / "out" / "merge_report.json").read_text())["diagnostics"]["frism"]
    assert got["learned"] and not got["cached"] and len(got["losses"]) == 4 and got["examples"] == 8
    assert all(math.isfinite(x) for x in got["losses"]) and got["kl_end"] <= got["kl_start"] + 1e-6
    key = merge_key(rec)
    _prompts_file(tmp_path / "p", shade=1)  # one image changed, same path
    assert merge_key(from_dict({**d, "prompts": str(file)})) != key
    merge_to_disk(from_dict({**d, "prompts": str(file)}), tmp_path / "again")
    again = json.loads((tmp_path / "again" / "merge_report.json").read_text())["diagnostics"]["frism"]
    assert not again["cached"]


def test_prompts_are_refused_for_other_methods_and_when_missing(tri, tmp_path):
    base = {"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"])}
    with pytest.raises(LabError, match=r"^'prompts' is used only by frism; method 'task_arithmetic' learns nothing$"):
        from_dict({**base, "method": "task_arithmetic", "prompts": "p.jsonl"})
    with pytest.raises(LabError, match=r"^prompts file not found: 'nowhere.jsonl'$"):
        from_dict({**base, "method": "frism", "prompts": "nowhere.jsonl"}, tmp_path)


def test_learning_holds_its_vlm_copy_the_task_vectors_and_the_gated_weights(tri):
    """learning_bytes against the checkpoint's own numbers: every VLM tensor and each gated matrix twice
    (its task vector, and W_v + delta(g) for the forward), float32
    on a CPU."""
    from safetensors import safe_open

    rec = recipe(tri, steps=1)
    report = check_triple(rec.vlm, rec.reasoner, rec.base)
    names = [c for c in report.layouts["vlm"].lm if c.startswith("layers.") and c.endswith("proj.weight")]
    s = gate_learning.Setup({"vlm": rec.vlm, "reasoner": rec.reasoner, "base": rec.base}, report.layouts, names,
                            rec.knobs(), 0, "cpu")
    total, gated = 0, 0
    with safe_open(str(tri["vlm"] / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            n = f.get_slice(k).get_shape()
            total += math.prod(n) * 4
        lm = report.layouts["vlm"].lm
        gated = sum(math.prod(f.get_slice(lm[c]).get_shape()) * 4 for c in names)
    assert gate_memory.learning_bytes(s) == total + 2 * gated
