"""Knockout on the bundled toy VLM: the text-only control beside the image suites, every number with
its 95% interval, and generation stopped at the answer scoring exactly as a full generation."""

from __future__ import annotations

import math

import pytest
import torch

from analysis import knockout
from analysis.evaluate import evaluate, load_model
from merging.errors import Cancelled
from tests.paths import TOY

Z = 1.959963984540054


@pytest.fixture(scope="module")
def toy_vlm():
    if not (TOY / "vlm" / "config.json").is_file():
        pytest.skip("the bundled toy family is not here")
    torch.set_num_threads(1)
    return load_model(TOY / "vlm")


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """The roots of (n + z^2) p^2 - (2k + z^2) p + k^2 / n = 0 (the score test's bounds)."""
    a, b, c = n + Z * Z, -(2 * k + Z * Z), k * k / n
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


def test_stopping_at_the_answer_scores_as_the_full_generation(toy_vlm):
    """Intact and with layer 0's attention knocked out (whose answers run to the token limit)."""
    for knocked in (False, True):
        with knockout.knocked_out(toy_vlm[0], 0, "attention") if knocked else _nothing():
            full = evaluate(toy_vlm, limit=6, return_items=True)
            short = evaluate(toy_vlm, limit=6, return_items=True, stop_at_answer=True)
        assert short["accuracy"] == full["accuracy"]
        for suite, recs in full["items"].items():
            for f, s in zip(recs, short["items"][suite]):
                assert f["correct"] == s["correct"] and f["output"].startswith(s["output"].rstrip())


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_knockout_reports_the_control_and_intervals(toy_vlm):
    model, proc = toy_vlm
    ko = knockout.knockout(model, proc, limit=8, layers=[0, 6], groups=("attention",))
    assert ko["control"] == "text_math" and ko["suites"] == ["perception", "visual_math", "text_math"]
    plain = evaluate(toy_vlm, limit=8, return_items=True)  # the intact model, scored here again
    for s in ko["suites"]:
        k = sum(r["correct"] for r in plain["items"][s])
        assert ko["n"][s] == 8 and ko["baseline"][s] == pytest.approx(k / 8)
        lo, hi = ko["baseline_ci"][s]
        want = _wilson_by_hand(k, 8)
        assert lo == pytest.approx(want[0], abs=1e-9) and hi == pytest.approx(want[1], abs=1e-9)
        for drop, (dlo, dhi), noise in zip(ko["drop"]["attention"][s], ko["drop_ci"]["attention"][s],
                                           ko["noise"]["attention"][s]):
            assert dlo - 1e-9 <= drop <= dhi + 1e-9 and -1 <= dlo <= dhi <= 1
            assert noise == (dlo <= 0 <= dhi)
    # layer 0's attention is what every answer needs: the control loses as much as perception
    assert ko["drop"]["attention"]["text_math"][0] >= 0.5


def test_a_cancelled_knockout_keeps_its_finished_layers(toy_vlm):
    """Cancelled while layer 2 is scored: layers 0 and 1 come back, scored as a run of just those layers
    scores them, and the weights are the intact model's again; cancelled before any layer: a plain cancel."""
    model, proc = toy_vlm
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def cancel_at(text):
        def progress(done, total, msg):
            if text in msg:
                raise Cancelled("cancelled")
        return progress

    with pytest.raises(knockout.PartialKnockout) as got:
        knockout.knockout(model, proc, limit=2, layers=[0, 1, 2], progress=cancel_at("layer 2"))
    part = got.value.result
    whole = knockout.knockout(model, proc, limit=2, layers=[0, 1])
    assert part["layers"] == [0, 1] and part["accuracy"] == whole["accuracy"] and part["drop"] == whole["drop"]
    assert part["drop_ci"] == whole["drop_ci"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(Cancelled) as plain:
        knockout.knockout(model, proc, limit=2, layers=[0, 1], progress=cancel_at("layer 0"))
    assert not isinstance(plain.value, knockout.PartialKnockout)
