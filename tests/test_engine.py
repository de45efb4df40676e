"""Streaming merge to disk on tiny real triples: identities, plan rules, atomicity, CLI, memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging import methods
from merging.checkpoint import Checkpoint
from merging.engine import merge_to_disk
from merging.errors import LabError
from merging.layout import derive_layout
from merging.recipe import from_dict
from tests.factories import make_tiny_triple

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def tri(tmp_path_factory):
    return make_tiny_triple(tmp_path_factory.mktemp("tri"), num_layers=2)


def recipe(tri, method, **kw):
    d = {"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"]), "method": method}
    return from_dict({**d, **kw})


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (not a dict)
    return out


def lm(folder) -> dict[str, torch.Tensor]:
    """canonical -> tensor of a model folder."""
    with Checkpoint.open(folder) as ck:
        return {c: ck.get(a) for c, a in derive_layout(ck).lm.items()}


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("method", methods.names())
def test_every_method_writes_loadable_model_with_vision_untouched(tri, tmp_path, method):
    out = tmp_path / "out"
    seen = []
    knobs = {"threshold": 0.0, "top_fraction": 0.0} if method == "ip_merging" else {}  # random toy task vectors barely align
    knobs = {"steps": 0} if method == "frism" else knobs  # gates learn on the toy family's scenes only (tests/test_frism.py)
    merge_to_disk(recipe(tri, method, parameters=knobs), out, progress=lambda d, t, m: seen.append((d, t)),
                  max_shard_bytes=60_000)
    src, dst = tensors(tri["vlm"]), tensors(out)
    assert sorted(src) == sorted(dst)
    with Checkpoint.open(tri["vlm"]) as ck:
        other = derive_layout(ck).other
    assert other and all(bitwise(src[n], dst[n]) for n in other)  # vision tower + projector
    changed = [n for n in src if not torch.equal(src[n], dst[n])]
    assert changed and all("layers" in n or n.endswith("norm.weight") for n in changed)
    assert seen[-1][0] == seen[-1][1] == len(src)
    assert {"config.json", "generation_config.json", "README.md", "recipe.yaml",
            "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}
    assert method in (out / "README.md").read_text() and leftovers(tmp_path) == []
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    gen = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)


@pytest.mark.parametrize("method,knobs", [("linear", {"alpha": 0.0}), ("task_arithmetic", {"alpha": 0.0}),
                                          ("layer_swap", {"alpha": 0.0}), ("ip_merging", {"lam": 0.0})])
def test_zero_strength_leaves_vlm_bit_identical(tri, tmp_path, method, knobs):
    merge_to_disk(recipe(tri, method, parameters=knobs), tmp_path / "o")
    src, dst = tensors(tri["vlm"]), tensors(tmp_path / "o")
    assert all(bitwise(src[n], dst[n]) for n in src)


def test_linear_alpha_one_gives_reasoner(tri, tmp_path):
    merge_to_disk(recipe(tri, "linear", parameters={"alpha": 1.0}), tmp_path / "o")
    out, r, v = lm(tmp_path / "o"), lm(tri["reasoner"]), lm(tri["vlm"])
    for c in out:
        assert torch.equal(out[c], v[c] if c in ("embed_tokens.weight", "lm_head.weight") else r[c]), c


def test_per_layer_list_and_layer_range(tri, tmp_path):
    v, r, b = lm(tri["vlm"]), lm(tri["reasoner"]), lm(tri["base"])
    merge_to_disk(recipe(tri, "task_arithmetic", parameters={"alpha": [0.2, 0.8]}), tmp_path / "a")
    out = lm(tmp_path / "a")
    for c in out:
        if c.startswith("layers.") or c == "norm.weight":
            a = 0.2 if c.startswith("layers.0.") else 0.8  # non-layer tensors use the last layer's value
            torch.testing.assert_close(out[c], v[c] + a * (r[c] - b[c]))
    merge_to_disk(recipe(tri, "frank", layers=[1, 1]), tmp_path / "b")
    out = lm(tmp_path / "b")
    for c in out:
        assert torch.equal(out[c], v[c]) == (not c.startswith("layers.1.")), c


def test_layer_swap_keeps_early_layers(tri, tmp_path):
    merge_to_disk(recipe(tri, "layer_swap", parameters={"alpha": 0.5, "base_layer_num": 0}), tmp_path / "o")
    out, v, r = lm(tmp_path / "o"), lm(tri["vlm"]), lm(tri["reasoner"])
    for c in out:
        if c.startswith("layers.0."):
            assert torch.equal(out[c], v[c])
        elif c.startswith("layers.1.") or c == "norm.weight":
            torch.testing.assert_close(out[c], 0.5 * v[c] + 0.5 * r[c])


def test_layer_swap_minus_one_takes_every_layer_from_the_reasoner(tri, tmp_path):
    """base_layer_num -1 as in the BR2V code: no VLM layer kept; alpha 1 gives the reasoner's LM."""
    merge_to_disk(recipe(tri, "layer_swap", parameters={"base_layer_num": -1}), tmp_path / "o")
    out, r = lm(tmp_path / "o"), lm(tri["reasoner"])
    merged = [c for c in out if c.startswith("layers.") or c == "norm.weight"]
    assert merged and all(torch.equal(out[c], r[c]) for c in merged)


def test_merge_shared_rows(tri, tmp_path):
    vlm = tmp_path / "vlm"
    shutil.copytree(tri["vlm"], vlm)
    t = tensors(vlm)
    for k in list(t):
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            t[k] = torch.cat([t[k], torch.randn(4, t[k].shape[1])])  # a VLM adds image tokens
    (vlm / "model.safetensors").unlink()
    save_file(t, vlm / "model.safetensors", metadata={"format": "pt"})
    rec = from_dict({"vlm": str(vlm), "reasoner": str(tri["reasoner"]), "method": "linear",
                     "parameters": {"alpha": 1.0}, "embeddings": "merge_shared_rows"})
    merge_to_disk(rec, tmp_path / "o")
    out, v, r = lm(tmp_path / "o"), lm(vlm), lm(tri["reasoner"])
    for c in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[c][:96], r[c]) and torch.equal(out[c][96:], v[c][96:])


def test_new_layout_bf16_names_dtypes_and_out_dtype(tmp_path):
    t3 = make_tiny_triple(tmp_path / "t", layout="new", dtype=torch.bfloat16)
    rec = recipe(t3, "ties")
    merge_to_disk(rec, tmp_path / "o")
    src, dst = tensors(t3["vlm"]), tensors(tmp_path / "o")
    assert sorted(src) == sorted(dst) and all(x.dtype == torch.bfloat16 for x in dst.values())
    merge_to_disk(recipe(t3, "ties", out_dtype="float32"), tmp_path / "f")
    dst = tensors(tmp_path / "f")
    with Checkpoint.open(t3["vlm"]) as ck:
        lay = derive_layout(ck)
    assert all(dst[a].dtype == torch.float32 for a in lay.lm.values())
    assert all(bitwise(src[n], dst[n]) for n in lay.other)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "o")
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 4)


@pytest.mark.parametrize("method,knobs,value", [("ties", {}, "nan"), ("task_arithmetic", {}, "inf"),
                                                ("linear", {"alpha": 0.0}, "nan")])
def test_nan_input_is_refused(tri, tmp_path, method, knobs, value):
    # linear at alpha 0 weighs the reasoner by 0: the bad value must still be found (NaN * 0 is NaN)
    bad = tmp_path / "bad"
    shutil.copytree(tri["reasoner"], bad)
    t = tensors(bad)
    t["model.layers.1.mlp.up_proj.weight"][5, 3] = float(value)
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    rec = from_dict({"vlm": str(tri["vlm"]), "reasoner": str(bad), "base": str(tri["base"]), "method": method,
                     "parameters": knobs})
    with pytest.raises(LabError, match=r"model\.layers\.1\.mlp\.up_proj\.weight of the reasoner"):
        merge_to_disk(rec, tmp_path / "o")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_error_mid_merge_leaves_nothing(tri, tmp_path, exc):
    def boom(done, total, msg):
        if done > 5:
            raise exc("injected")

    with pytest.raises(exc):
        merge_to_disk(recipe(tri, "ties"), tmp_path / "o", progress=boom, max_shard_bytes=50_000)
    assert list(tmp_path.iterdir()) == []


def test_cancel_and_existing_output(tri, tmp_path):
    calls = []
    with pytest.raises(LabError, match="cancelled"):
        merge_to_disk(recipe(tri, "frank"), tmp_path / "o", cancel=lambda: calls.append(1) or len(calls) > 3)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep me")
    with pytest.raises(LabError, match="not empty"):
        merge_to_disk(recipe(tri, "linear"), tmp_path / "o")
    assert (tmp_path / "o" / "x").read_text() == "keep me"
    with pytest.raises(LabError, match="was not written by the lab"):  # --overwrite replaces only the lab's own
        merge_to_disk(recipe(tri, "linear"), tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "x").read_text() == "keep me"
    (tmp_path / "o" / "x").unlink()
    merge_to_disk(recipe(tri, "linear"), tmp_path / "o")
    merge_to_disk(recipe(tri, "ties"), tmp_path / "o", overwrite=True)
    assert json.loads((tmp_path / "o" / "merge_report.json").read_text())["method"] == "ties"
    assert leftovers(tmp_path) == []


def _write_recipe(path: Path, tri, method="linear", params=None) -> Path:
    d = {"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"]), "method": method}
    if params:
        d["parameters"] = params
    path.write_text(json.dumps(d))  # JSON is YAML
    return path


def test_cli_exit_codes(tri, tmp_path, capsys):
    ok = subprocess.run([PY, "-m", "merging", "merge", str(_write_recipe(tmp_path / "r.yaml", tri)),
                         str(tmp_path / "o"), "--no-progress", "--max-shard-size", "100KB"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o" / "model.safetensors.index.json").exists()
    from merging.__main__ import main

    for i, (method, params, msg) in enumerate([
            ("nope", None, "unknown method"), ("linear", {"alpha": 3}, "out of range"),
            ("task_arithmetic", {"alpha": [0.1, 0.2, 0.3]}, "list of length 3"),
            ("ip_merging", {"rank": 0}, "out of range"), ("ip_merging", {"rank": -4}, "out of range"),
            ("ties", {"density": 0}, "out of range")]):
        rc = main(["merge", str(_write_recipe(tmp_path / f"b{i}.yaml", tri, method, params)), str(tmp_path / f"x{i}")])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"x{i}").exists()


def test_peak_memory_is_a_few_tensors(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from make_synthetic import make_triple

    make_triple(tmp_path, preset="small", llm_vlm=False)
    res = subprocess.run([PY, str(REPO / "tests/benchmarks/make_synthetic.py"), "measure",
                          str(tmp_path / "recipe_task_arithmetic.yaml"), str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["vlm_bytes"] > 150e6
    assert m["peak_anon_growth_bytes"] < 0.4 * m["vlm_bytes"], m
