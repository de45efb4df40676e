"""The real app in a subprocess, driven through its API with gradio_client (one session per Client)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from webapp.presets import DEFAULT as TOY_PRESET

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _merge(client, method="task_arithmetic", **knobs):
    return client.predict(preset=TOY_PRESET, method=method, api_name="/merge", **knobs)


def test_merge_figure_chat(client, toy_dir):
    from gradio_client import handle_file

    status, recipe_yaml, recipe_file, *_ = _merge(client, knob1=0.5)
    assert "Merged with task_arithmetic" in status, status
    assert "method: task_arithmetic" in recipe_yaml and "alpha: 0.5" in recipe_yaml
    assert recipe_file and Path(recipe_file).read_text().strip() == recipe_yaml.strip()

    status, plot = client.predict(preset=TOY_PRESET, rank=8, api_name="/similarity")
    assert status.startswith("✓"), status
    assert plot and "plot" in json.dumps(plot)

    sample = json.loads((toy_dir / "samples" / "samples.json").read_text())[0]
    message = {"text": sample["question"], "files": [handle_file(str(toy_dir / "samples" / sample["image"]))]}
    merged, original, *_ = client.predict(message=message, preset=TOY_PRESET, max_new_tokens=12,
                                          api_name="/chat")
    answer = merged[-1]["content"]
    answer = answer if isinstance(answer, str) else json.dumps(answer)
    assert merged[-1]["role"] == "assistant" and answer.strip() and "No merge yet" not in answer
    assert original[-1]["role"] == "assistant" and original[-1]["content"]


def test_cancel_then_merge_again(client):
    job = client.submit(preset=TOY_PRESET, items_per_suite=40, live=True, api_name="/knockout")  # live: not the shipped one
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:  # wait until the worker is running it
        outs = job.outputs()
        if outs and "Computing" in str(outs[-1][0]):
            break
        time.sleep(0.1)
    # the merge panel's Cancel leaves the analysis tab's knockout alone; the tab's own Cancel stops it
    assert client.predict(api_name="/cancel") == "Nothing is running."
    assert not job.done()
    assert client.predict(api_name="/cancel_knockout") == "■ Cancelling…"
    final = job.result(timeout=120)
    assert "cancelled" in final[0], final[0]
    status, *_ = _merge(client, method="linear", knob1=0.2)
    assert "Merged with linear" in status, status


def test_incompatible_or_missing_triple_refused(client):
    status, *_ = client.predict(preset="LLaVA-NeXT-8B + Dart-Math prop2diff (BR2V)", method="task_arithmetic",
                                api_name="/merge")
    assert "Cannot merge" in status and "not in the local Hugging Face cache" in status, status


def test_models_root_refuses_escapes(tmp_path):
    from merging.errors import LabError
    from webapp.presets import resolve_custom

    root = tmp_path / "models"
    (root / "vlm").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    assert resolve_custom("vlm", str(root)) == str((root / "vlm").resolve())
    for bad in ("../models/vlm", str(tmp_path), "out", "missing"):
        with pytest.raises(LabError):
            resolve_custom(bad, str(root))


def test_a_very_long_model_name_is_not_echoed_whole(tmp_path):
    from merging.errors import LabError
    from merging.hub import resolve

    name = "x" * 5000
    with pytest.raises(LabError) as e:
        resolve(str(tmp_path / name))
    msg = str(e.value)
    assert len(msg) < 200 and "(5,0" in msg and msg.startswith("model folder not found: ")


def test_handout_is_offered_as_one_offline_file(client, toy_dir):
    """The Handout button after a merge: one HTML file that fetches nothing, with the scores of both models,
    every step of the walkthrough and no path of the server's."""
    import re

    from analysis.handout import GENERATOR
    from webapp.ui.walkthrough import STEPS

    _merge(client, knob1=1.0)
    status, file = client.predict(limit=3, api_name="/handout")
    assert status.startswith("✓"), status
    file = file.get("value", file) if isinstance(file, dict) else file  # a gr.update: {"value": path, ...}
    html = Path(file if isinstance(file, str) else file["path"]).read_text()
    assert GENERATOR in html[:400] and not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']https?:", html)
    assert re.search(r"<tr><td>visual_math</td><td>[\d.]+ \[[^<]*</td><td>[\d.]+ \[", html), "no scores table"
    for step in STEPS:
        assert step.title.replace("'", "&#x27;") in html, step.title
    assert str(toy_dir) not in html and "/tmp/" not in html
