"""The app's per-layer box goes through the hardened YAML reader (issue: alias bombs stall the worker)."""

from __future__ import annotations

import time

import pytest

from merging.errors import LabError
from webapp.ui import recipes

TRIPLE = {"vlm": "assets/toy/vlm", "reasoner": "assets/toy/math", "base": "assets/toy/base"}
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_alias_bomb_in_the_per_layer_box_is_refused_at_once():
    t0 = time.monotonic()
    with pytest.raises(LabError, match="per-layer values") as e:
        recipes.build(TRIPLE, "task_arithmetic", [0.5], advanced=BOMB)
    assert time.monotonic() - t0 < 2.0 and "\n" not in str(e.value)


def test_per_layer_box_still_takes_a_list():
    r = recipes.build(TRIPLE, "task_arithmetic", [0.5], advanced="alpha: [0.1, 0.2, 0.3, 0.4]")
    assert r["parameters"]["alpha"] == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(LabError, match="per-layer values"):
        recipes.build(TRIPLE, "task_arithmetic", [0.5], advanced="alpha: [0.1,\n")
