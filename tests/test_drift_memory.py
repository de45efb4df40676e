"""What a DRIFT fine-tune holds, against the bundled VLM's safetensors header and against the optimizer's
own state after a real step; the one-line refusal before anything loads."""

from __future__ import annotations

import glob
import math
import re

import pytest
import torch
from safetensors import safe_open

from merging.drift_memory import HEADROOM, DriftBytes, GiB, drift_bytes, refusal
from merging.finetune import trainable_parameters
from merging.loading import load_model
from tests.paths import TOY

PROJ = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)$")


def _header_sizes(folder) -> dict[str, int]:
    out = {}
    for f in glob.glob(str(folder / "*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[k] = math.prod(sf.get_slice(k).get_shape())
    return out


def test_the_bytes_follow_the_checkpoint_header():
    """Every tensor in float32; 12 bytes per language-model parameter; 4 per projection parameter, the
    names read with a pattern of the checkpoint's own naming (not the layout code)."""
    sizes = _header_sizes(TOY / "vlm")
    lm = sum(n for k, n in sizes.items() if k.startswith("language_model."))
    proj = sum(n for k, n in sizes.items() if PROJ.search(k))
    assert proj > 0 and lm > proj
    assert drift_bytes(str(TOY / "vlm"), str(TOY / "math")) == DriftBytes(4 * sum(sizes.values()), 12 * lm, 4 * proj)


def test_the_training_share_is_what_adamw_holds_after_a_step():
    """The gradients and AdamW's two moments a real step leaves, counted in bytes, equal the rule's share."""
    model, _ = load_model(str(TOY / "vlm"), "cpu", dtype="float32")
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.float().square().sum() for p in params).backward()
    opt.step()
    held = sum(p.grad.nbytes for p in params) + sum(
        t.nbytes for st in opt.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    assert held == drift_bytes(str(TOY / "vlm"), str(TOY / "math")).training


def test_a_fine_tune_that_cannot_fit_is_refused_in_one_line():
    b = DriftBytes(model=31 * GiB, training=85 * GiB, prior=24 * GiB)  # about the Qwen2-VL-7B shape
    msg = refusal(b, "cuda", free_device=79 * GiB, free_host=100 * GiB, label="qwen2-vl-7b")
    assert msg.startswith("DRIFT: fine-tuning qwen2-vl-7b holds about 140.0 GiB on cuda (the VLM in float32 31.0")
    assert "79.0 GiB is free" in msg and "\n" not in msg
    assert refusal(b, "cuda", free_device=200 * GiB, free_host=100 * GiB, label="x") is None
    short = refusal(b, "cuda", free_device=200 * GiB, free_host=20 * GiB, label="x")
    assert short.startswith("DRIFT: the prior of x takes 24.0 GiB of host RAM") and "20.0 GiB is available" in short
    assert refusal(b, "cpu", free_device=160 * GiB, free_host=160 * GiB, label="x") is None  # the prior once
    assert "on cpu" in refusal(b, "cpu", free_device=100 * GiB, free_host=100 * GiB, label="x")
    assert "use a larger card" in msg and "a machine with more" in refusal(b, "cpu", 100 * GiB, 100 * GiB, "x")


def test_the_bundled_family_fits_a_small_machine():
    b = drift_bytes(str(TOY / "vlm"), str(TOY / "math"))
    assert sum(b.on("cpu")) < 2**27 and refusal(b, "cpu", GiB, GiB, "toy") is None


def _toy_bytes() -> tuple[int, int]:
    """(frism's holding on a GPU, a DRIFT fine-tune's on a GPU) for the bundled family, from the headers:
    the toy's checkpoint dtype is what learning keeps on a GPU; DRIFT is float32 throughout."""
    total = gated = n_all = n_lm = n_proj = 0
    layer2d = re.compile(r"^language_model\.model\.layers\.\d+\.")
    for f in glob.glob(str(TOY / "vlm" / "*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = sf.get_slice(k)
                n, item = math.prod(t.get_shape()), {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
                total += n * item
                gated += n * item if layer2d.search(k) and len(t.get_shape()) == 2 else 0
                n_all += n
                n_lm += n if k.startswith("language_model.") else 0
                n_proj += n if PROJ.search(k) else 0
    return total + 2 * gated, 4 * n_all + 12 * n_lm + 4 * n_proj


@pytest.mark.parametrize("margin", [-64, 64])
def test_the_plan_says_whether_frism_and_drift_fit(margin):
    """The plan's last lines: each method's bytes against the free memory, the verdict flipping 64 bytes either
    side of the headroom's edge of the figure counted from the headers."""
    from merging import method_needs

    frism, drift = _toy_bytes()
    for i, need in enumerate((frism, drift)):
        free = int(need / HEADROOM) + margin
        got = method_needs.lines(str(TOY / "vlm"), str(TOY / "math"), str(TOY / "base"), "cuda", free, "here")
        assert got[i].endswith(": does not fit" if margin < 0 else ": fits"), got[i]
    assert len(method_needs.lines(str(TOY / "vlm"), str(TOY / "math"), None, "cuda", GiB, "here")) == 1  # no base
