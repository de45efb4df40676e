"""The DRIFT panel of the real app, through its API: a tiny fine-tune in the worker, then chat with it; a run
on an uploaded training set."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.factories import make_tiny_triple
from webapp.presets import CUSTOM
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


def test_the_layers_box_trains_those_layers_only(client, app_handle, toy_dir):
    """A range trains those decoder layers (the result differs from the VLM there alone); a malformed box
    and a range past the model are refused in one line, the latter by the worker before it loads."""
    from safetensors.torch import load_file

    runs = app_handle.cache / "drift"
    before = {p.name for p in runs.iterdir()} if runs.is_dir() else set()
    status = client.predict(preset=TOY_PRESET, mode="adaptive_cosine", alpha=1.0, steps=2, lr=1e-3, batch_size=4,
                            examples=8, layers="6-7", api_name="/drift")
    assert "of layers 6-7 done" in status and "2 steps" in status, status
    (new,) = [p for p in runs.iterdir() if p.name not in before and not p.name.startswith(".")]
    vlm, got = {}, {}
    for f in sorted((toy_dir / "vlm").glob("*.safetensors")):
        vlm.update(load_file(str(f)))
    for f in sorted(new.glob("*.safetensors")):
        got.update(load_file(str(f)))
    changed = {k for k in vlm if not torch.equal(vlm[k], got[k].to(vlm[k].dtype))}
    assert changed and all(re.search(r"\.layers\.[67]\.", k) for k in changed), sorted(changed)[:5]
    bad = client.predict(preset=TOY_PRESET, steps=2, examples=8, layers="six", api_name="/drift")
    assert bad.startswith("✗ **Cannot run DRIFT:** drift layers: write first-last"), bad
    past = client.predict(preset=TOY_PRESET, steps=2, examples=8, layers="6-9", api_name="/drift")
    assert "drift layers [6, 9] is out of range: the model has 8 decoder layers (0 to 7)" in past, past


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


def _upload_set(folder: Path, rows: list, toy_dir: Path) -> list[Path]:
    """A training JSONL and its images side by side (uploaded one by one, matched by file name)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            lines.append(row)
            continue
        shutil.copy(toy_dir / "samples" / sorted(p.name for p in (toy_dir / "samples").glob("*.png"))[i], folder / f"{i}.png")
        lines.append(json.dumps({"question": row[0], "answer": row[1], "image": f"images/{i}.png"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return [folder / "train.jsonl", *sorted(folder.glob("*.png"))]


def test_drift_on_an_uploaded_set(client, app_handle, toy_dir, tmp_path):
    """The panel's upload drives a real run: its count, the run trained on it, the same content uploaded
    again reused (the run key is the content's hash), a changed image retrained, a bad line refused."""
    from gradio_client import handle_file

    rows = [("how many circles ?", "lily has 3 cats ."), ("describe the image .", "ben has 7 cars ."),
            ("how many squares ?", "mia gets 2 books .")]
    files = _upload_set(tmp_path / "set", rows, toy_dir)
    shown = client.predict(files=[handle_file(str(p)) for p in files], api_name="/drift_data")
    assert shown.startswith("✓ **3 items** read from `train.jsonl`"), shown
    runs = app_handle.cache / "drift"
    before = {p.name for p in runs.iterdir()} if runs.is_dir() else set() if (app_handle.cache / "drift").is_dir() else set()
    args = {"preset": TOY_PRESET, "mode": "adaptive_cosine", "alpha": 1.0, "steps": 4, "lr": 3e-3, "batch_size": 3,
            "examples": 3, "api_name": "/drift"}
    status = client.predict(files=[handle_file(str(p)) for p in files], **args)
    status = status if isinstance(status, str) else status[0]
    assert "done" in status and "4 steps" in status and "trained on the 3 items of `train.jsonl`" in status, status
    first, last = map(float, re.search(r"loss ([\d.]+) → ([\d.]+)", status).groups())
    assert last < first, status  # answers the toy never gives: it learns them
    new = {p.name for p in (app_handle.cache / "drift").iterdir()} - before
    assert len(new) == 1 and "3 of the 3 items of train.jsonl" in (app_handle.cache / "drift" / new.pop() / "README.md").read_text()
    again = client.predict(files=[handle_file(str(p)) for p in files], **args)
    assert "reused" in str(again), again
    raw = bytearray(files[1].read_bytes())
    files[1].write_bytes(bytes(raw) + b"\0")  # one more byte: another image file, another run
    changed = client.predict(files=[handle_file(str(p)) for p in files], **args)
    assert "reused" not in str(changed) and "4 steps" in str(changed), changed

    archive = tmp_path / "set.zip"  # the zip form keeps the JSONL's folders
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(files[0], "train.jsonl")
        for p in files[1:]:
            zf.write(p, f"images/{p.name}")
    shown = client.predict(files=[handle_file(str(archive))], api_name="/drift_data")
    assert shown.startswith("✓ **3 items** read from `train.jsonl`"), shown

    bad = _upload_set(tmp_path / "bad", [rows[0], '{"question": "how many ?"}'], toy_dir)
    refused = client.predict(files=[handle_file(str(p)) for p in bad], **args)
    assert 'Cannot run DRIFT:** train.jsonl line 2: "answer" is missing' in str(refused), refused
    assert client.predict(files=[handle_file(str(p)) for p in bad], api_name="/drift_data") == \
        '✗ train.jsonl line 2: "answer" is missing'


def test_drift_on_another_vlm_without_data_is_refused(client, tmp_path):
    tri = make_tiny_triple(tmp_path)
    status = client.predict(preset=CUSTOM, vlm=str(tri["vlm"]), reasoner=str(tri["reasoner"]), base=str(tri["base"]),
                            steps=2, examples=2, api_name="/drift")
    status = status if isinstance(status, str) else status[0]
    assert status == (f"✗ **Cannot run DRIFT:** {Path(tri['vlm']).name} is not the bundled toy family: upload your "
                      "training data (a .jsonl with its images, or one .zip) above"), status
