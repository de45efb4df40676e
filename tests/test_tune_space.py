"""The tuner's search space: every trial it can draw is a recipe the method accepts, a layer knob stays
inside the model, and a toggle's hidden knobs are never drawn (no trial is wasted on a refusal)."""

from __future__ import annotations

import optuna
import pytest

from analysis import tune_space
from merging import methods
from merging.recipe import from_dict

NUM_LAYERS = 8
TRIPLE = {"vlm": "assets/toy/vlm", "reasoner": "assets/toy/math", "base": "assets/toy/base"}


def _draws(method: str, n: int = 60) -> list[dict]:
    """n trials of a random sampler over the method's space, as recipe knobs."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(tune_space.suggest(trial, method, NUM_LAYERS))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("method", methods.names())
def test_every_drawn_point_is_a_recipe_the_method_accepts(method):
    for knobs in _draws(method, 25):
        from_dict({**TRIPLE, "method": method, "parameters": knobs})  # raises LabError on a refused one


def test_a_layer_knob_is_searched_over_the_models_layers_only():
    values = {k["base_layer_num"] for k in _draws("layer_swap", 200)}
    # -2 (the first half), -1 (no layer kept) and each of the 8 layers; nothing past layer 7
    assert values == set(range(-2, NUM_LAYERS))


def test_frank_draws_its_prior_or_w_v_never_both():
    draws = _draws("frank", 80)
    on = [k for k in draws if k["use_prior"] == 1]
    off = [k for k in draws if k["use_prior"] == 0]
    assert on and off
    assert all("w_v" not in k and "beta" in k for k in on)
    assert all("beta" not in k and "w_v" in k for k in off)
    # the defaults, enqueued as the first trial, are the prior off with w_v 0.5 everywhere
    assert tune_space.defaults_params("frank", NUM_LAYERS) == {"use_prior": 0, "w_v_start": 0.5, "w_v_end": 0.5}


def _as_knobs(method: str, params: dict) -> dict:
    """Trial parameters back to recipe knobs, as a FixedTrial hands them to suggest."""
    return tune_space.suggest(optuna.trial.FixedTrial(params), method, NUM_LAYERS)


@pytest.mark.parametrize("method", methods.names())
def test_a_study_starts_from_the_defaults_and_every_grid_point(method):
    starts = [_as_knobs(method, p) for p in tune_space.start_points(method, NUM_LAYERS)]
    m = methods.get(method)
    for knobs in [{}] + m.grid(NUM_LAYERS):
        want = {**m.defaults(), **knobs}
        # some start is this point: each knob it sets holds the point's value (a schedule start == end)
        assert any(all(v in (want[k], [want[k], want[k]]) for k, v in s.items()) for s in starts), knobs
    for s in starts:
        from_dict({**TRIPLE, "method": method, "parameters": s})
    assert len(starts) == len({repr(s) for s in starts})  # no point twice


def test_task_arithmetics_start_points_are_its_defaults_then_its_grid():
    starts = [_as_knobs("task_arithmetic", p) for p in tune_space.start_points("task_arithmetic", NUM_LAYERS)]
    assert [s["alpha"] for s in starts] == [[a, a] for a in (1.0, 0.2, 0.4, 0.6, 0.8, 1.2)]
