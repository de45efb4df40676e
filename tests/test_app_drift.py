"""The DRIFT panel of the real app, through its API: a tiny fine-tune in the worker, then chat with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from webapp.presets import DEFAULT as TOY_PRESET

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_drift_then_chat(client, app_handle):
    status = client.predict(preset=TOY_PRESET, mode="adaptive_cosine", alpha=1.0, steps=3, lr=1e-4,
                            batch_size=4, examples=8, api_name="/drift")
    assert "done" in status and "3 steps" in status, status
    folders = [p for p in (app_handle.cache / "drift").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()

    merged, original, *_ = client.predict(message={"text": "What is 2 + 3?", "files": []}, preset=TOY_PRESET,
                                          max_new_tokens=8, api_name="/chat")
    answer = merged[-1]["content"]
    answer = answer if isinstance(answer, str) else json.dumps(answer)
    assert merged[-1]["role"] == "assistant" and answer.strip() and "No merge yet" not in answer
    assert "error" not in answer, answer
    assert original[-1]["role"] == "assistant" and original[-1]["content"]

    again = client.predict(preset=TOY_PRESET, mode="adaptive_cosine", alpha=1.0, steps=3, lr=1e-4,
                           batch_size=4, examples=8, api_name="/drift")
    assert "reused" in again, again
    assert client.predict(api_name="/drift_cancel") == "Nothing is running."
    assert Path(folders[0]).is_dir()


def test_drift_cancel(client, app_handle):
    import time

    job = client.submit(preset=TOY_PRESET, alpha=0.0, steps=500, lr=1e-4, batch_size=2, examples=8,
                        api_name="/drift")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:  # wait until the worker is training
        outs = job.outputs()
        if outs and "step " in str(outs[-1]):
            break
        time.sleep(0.1)
    assert client.predict(api_name="/drift_cancel") == "■ Cancelling…"
    final = job.result(timeout=60)
    final = final if isinstance(final, str) else final[0]
    assert "cancelled" in final, final
    # once the status says so, it keeps saying so until the end (no progress line over it)
    texts = [o if isinstance(o, str) else o[0] for o in job.outputs()]
    first = next((i for i, o in enumerate(texts) if "Cancelling" in o), len(texts) - 1)  # a fast stop shows none
    assert all("Cancelling" in o for o in texts[first:-1]), texts[first:]
    assert not [p for p in (app_handle.cache / "drift").iterdir() if p.name.startswith(".")]


def test_drift_out_of_range_names_the_field(client):
    for kwargs, expected in (({"alpha": 500.0}, "drift alpha = 500.0 is out of range; allowed 0.0 to 100.0"),
                             ({"lr": 0.0}, "drift lr = 0.0 is out of range"),
                             ({"steps": None}, "drift steps: enter a number")):
        args = {"preset": TOY_PRESET, "mode": "adaptive_cosine", "alpha": 1.0, "steps": 3, "lr": 1e-4,
                "batch_size": 4, "examples": 8, **kwargs}
        status = client.predict(**args, api_name="/drift")
        status = status if isinstance(status, str) else status[0]
        assert status.startswith("✗ **Cannot run DRIFT:**") and expected in status, status
