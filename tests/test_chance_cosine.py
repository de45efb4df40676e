"""The similarity plot's random baseline: the 95% band of cos(u, w) for unrelated task vectors of
each matrix's shape, against 1.96/sqrt(d) written here and against cosines of random tensors."""

import math

import plotly.graph_objects as go
import pytest
import torch
from safetensors import safe_open

from analysis import chance_cosine, figures, similarity
from tests.paths import TOY

REFS = (TOY / "vlm", TOY / "math", TOY / "base")


@pytest.fixture(scope="module")
def sim():
    return similarity.similarity(*REFS, rank=4, use_cache=False)


def test_band_is_1_96_over_sqrt_numel_of_each_matrix(sim):
    with safe_open(str(TOY / "vlm" / "model.safetensors"), "pt") as f:
        shape = f.get_slice("language_model.model.layers.0.self_attn.k_proj.weight").get_shape()
        names = f.keys()
        block = sum(math.prod(f.get_slice(n).get_shape()) for n in names
                    if n.startswith("language_model.model.layers.3."))
    d = shape[0] * shape[1]
    assert sim["numel"]["self_attn.k_proj"] == d and sim["block_numel"][3] == block
    modules, blocks = chance_cosine.bands(sim)
    assert modules["self_attn.k_proj"] == pytest.approx(1.96 / math.sqrt(d), rel=1e-3)
    assert blocks[3] == pytest.approx(1.96 / math.sqrt(block), rel=1e-3)


@pytest.mark.parametrize("shape", [(64, 128), (384, 128)])
def test_band_holds_95_percent_of_random_cosines(shape):
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(2000, *shape, generator=g), torch.randn(2000, *shape, generator=g)
    cos = torch.nn.functional.cosine_similarity(u.flatten(1), w.flatten(1), dim=1)
    inside = float((cos.abs() < chance_cosine.chance_band(shape[0] * shape[1])).float().mean())
    assert inside == pytest.approx(0.95, abs=0.02)
    assert float(cos.std()) == pytest.approx(1 / math.sqrt(shape[0] * shape[1]), rel=0.08)


def test_figure_draws_the_band_under_every_cosine(sim):
    fig = figures.similarity_figure(sim)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 1
    width = 1.96 / math.sqrt(sim["numel"]["mlp.up_proj"])
    col = list(bars[0].x).index("mlp.up_proj")
    assert bars[0].base[col] == pytest.approx(-width, rel=1e-3) and bars[0].y[col] == pytest.approx(2 * width, rel=1e-3)
    points = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert len(points) == sim["num_layers"]
    # a result cached before the element counts were kept still draws, without the band
    old = {k: v for k, v in sim.items() if k not in ("numel", "block_numel")}
    assert not [t for t in figures.similarity_figure(old).data if isinstance(t, go.Bar)]
