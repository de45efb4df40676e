"""What the real app reads and serves, against `python app.py` in a subprocess.

The attacks go over plain HTTP, as a hostile client would: gradio_client uploads a local file
before it calls, so it could never name a path on the server. A request may only read files
uploaded to this server (its own private upload folder) or under --models-root; only this
session's outputs are served; a hub id resolves through the Hugging Face cache and never
relative to the app's working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.app_fixtures import ROOT, start_app, stop_app
from webapp.presets import CUSTOM, DEFAULT

HUB_ID = "toy-org/tiny-vlm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """A model laid out as huggingface_hub's cache does (refs/main -> snapshots/<commit>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


def _secret_png(path: Path) -> bytes:
    """A small image no other file has (random pixels), so any copy of it can be recognised."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng().integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def lab(toy_dir, tmp_path_factory):
    """The app with a models root and its own Hugging Face cache (HF_HUB_CACHE) holding HUB_ID."""
    tmp = tmp_path_factory.mktemp("files")
    root = tmp / "models"
    for name in ("vlm", "math", "base"):
        shutil.copytree(toy_dir / name, root / name)
    hub = tmp / "hub"
    snapshot = _fake_hub_cache(hub, HUB_ID, toy_dir / "vlm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(hub))
        proc, url = start_app(toy_dir, tmp / "cache", tmp / "app.log", ["--models-root", str(root)])
    yield {"url": url, "cache": tmp / "cache", "root": root, "snapshot": snapshot, "log": tmp / "app.log"}
    stop_app(proc)


@pytest.fixture(scope="module")
def client(lab):
    from gradio_client import Client

    return Client(lab["url"], verbose=False)


def raw_call(url: str, api: str, data: list) -> tuple[str, object]:
    """(last event, its data) of one call over plain HTTP: whatever path a FileData names is sent as is."""
    req = urllib.request.Request(f"{url}gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event_id = json.load(r)["event_id"]
    event, payload = None, None
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=300) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                payload = json.loads(line[6:])
    return event, payload


def fetch(url: str, path: str | Path) -> tuple[int, bytes]:
    """Status and body of GET /gradio_api/file=PATH."""
    try:
        with urllib.request.urlopen(f"{url}gradio_api/file={urllib.parse.quote(str(path))}", timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def file_data(path: Path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def copies_of(secret: bytes, folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size == len(secret)
            and p.read_bytes() == secret]


def upload(url: str, path: Path) -> str:
    """Upload a file as the browser does (POST /gradio_api/upload); its path on the server."""
    import httpx

    with open(path, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, f, "image/png")}, timeout=30)
    r.raise_for_status()
    return r.json()[0]


def _upload_dir(url: str, toy_dir: Path) -> Path:
    """This app's upload folder, from a real upload of a sample that /chat reads and echoes (the control)."""
    sample = sorted((toy_dir / "samples").glob("*.png"))[0]
    event, payload = raw_call(url, "chat", _chat_args({"text": "how many circles are there ?",
                                                       "files": [file_data(upload(url, sample))]}))
    assert event == "complete", payload
    original = payload[1]
    echoed = original[0]["content"][0]["file"]
    assert not original[-1]["content"][0]["text"].startswith("✗"), original
    assert fetch(url, echoed["path"]) == (200, sample.read_bytes())
    return Path(echoed["path"]).parent.parent


def test_the_bundled_examples_are_uploads(lab, upload_dir):
    """What the browser sends when an example is clicked (the example's copy in the upload folder) is read."""
    with urllib.request.urlopen(f"{lab['url']}config", timeout=30) as r:
        config = json.load(r)
    (samples,) = [c["props"]["samples"] for c in config["components"] if c.get("type") == "dataset"]
    message = samples[0][0]
    assert Path(message["files"][0]["path"]).is_relative_to(upload_dir), message
    event, payload = raw_call(lab["url"], "chat", _chat_args(message))
    assert event == "complete" and not payload[1][-1]["content"][0]["text"].startswith("✗"), payload


def _planted(tmp_path: Path) -> dict[str, tuple[Path, bytes]]:
    """Secret images where an attacker might point: another Gradio app's upload (the shared /tmp/gradio),
    any folder on the server, and the app's working directory."""
    shared = Path(tempfile.gettempdir()) / "gradio" / f"lab-test-{uuid.uuid4().hex}" / "secret.png"
    cwd = ROOT / "tests" / f"secret-{uuid.uuid4().hex}.png"
    out = {}
    for label, path in (("shared upload", shared), ("server folder", tmp_path / "secret.png"), ("cwd", cwd)):
        out[label] = (path, _secret_png(path))
    return out


def _chat_args(message: dict) -> list:
    # /chat's inputs in order (the gr.State values are placeholders the server replaces with its own):
    # (message, turns, this tab's merge, the model compared with, the triple, max new tokens, temperature, memory)
    return [message, None, None, None, DEFAULT, "", "", "", 8, 0.0, False]


def _refused(event, payload, secret_path: Path) -> None:
    """The call failed without a word of Gradio's own (its refusals name the server's folders), or answered
    with the lab's refusal; the file is neither echoed nor served."""
    text = json.dumps(payload)
    if event == "error":
        assert payload is None or not (payload.get("error") if isinstance(payload, dict) else payload), text
    else:
        assert "✗ file refused" in text, text
    assert f"file={secret_path}" not in text and '"path": "' + str(secret_path) not in text, text


@pytest.fixture(scope="module")
def upload_dir(lab, toy_dir) -> Path:
    return _upload_dir(lab["url"], toy_dir)


def _each_planted_file_is_refused(lab, upload_dir, tmp_path, api: str, args_for) -> None:
    """Plant secrets where an attacker might point; `api` called with each must refuse it, serve it
    nowhere and copy it nowhere."""
    planted = _planted(tmp_path)
    try:
        for label, (path, secret) in planted.items():
            event, payload = raw_call(lab["url"], api, args_for(path))
            _refused(event, payload, path)
            assert fetch(lab["url"], path)[0] == 403, label
            assert not copies_of(secret, upload_dir), f"{label}: a copy of the file is being served"
    finally:
        for path, _ in planted.values():
            path.unlink(missing_ok=True)
        shutil.rmtree(planted["shared upload"][0].parent, ignore_errors=True)


def test_chat_reads_only_this_servers_uploads(lab, upload_dir, tmp_path):
    _each_planted_file_is_refused(lab, upload_dir, tmp_path, "chat",
                                  lambda path: _chat_args({"text": "how many ?", "files": [file_data(path)]}))
    assert upload_dir.name.startswith("merge-lab-uploads-"), upload_dir  # private, not the shared /tmp/gradio


def test_refusals_never_name_the_servers_folders(lab, upload_dir):
    """Gradio's own refusals would name the working directory, the temp folder (a relative path is resolved
    against the working directory) and the blocked cache folders; the app shows none of them."""
    blocked = lab["cache"] / "exports" / "x.zip"
    for path in ("secret.png", "../secret.png", str(blocked)):
        event, payload = raw_call(lab["url"], "chat", _chat_args({"text": "how many ?",
                                                                  "files": [file_data(Path(path))]}))
        text = json.dumps(payload)
        for folder in (str(ROOT), str(lab["cache"]), tempfile.gettempdir() + "/", str(upload_dir)):
            assert folder not in text, (path, folder, text)
        _refused(event, payload, Path(path))


def test_attention_reads_only_this_servers_uploads(lab, client, upload_dir, toy_dir, tmp_path):
    from gradio_client import handle_file

    _each_planted_file_is_refused(lab, upload_dir, tmp_path, "attention",
                                  lambda path: [DEFAULT, "", "", "", None, [file_data(path)], "describe the image ."])
    sample = sorted((toy_dir / "samples").glob("*.png"))[0]
    status, *_ = client.predict(preset=DEFAULT, images=[handle_file(str(sample))], question="describe the image .",
                               api_name="/attention")
    assert status.startswith("✓"), status  # control: an uploaded image is used


def test_only_this_sessions_outputs_are_served(lab, client, toy_dir):
    status, _, recipe_file, *_ = client.predict(method="linear", knob1=0.3, api_name="/merge")
    assert "Merged with linear" in status, status
    assert client.predict(api_name="/similarity")[0].startswith("✓")
    exported, archive = client.predict(api_name="/export")
    assert exported.startswith("✓") and "download it below" in exported, exported
    export_dir = Path(exported.split("`")[1])
    assert archive["visible"] is True  # a visibility update: the file box appears with the zip in it
    with zipfile.ZipFile(archive["value"]) as z:  # this session's download: the whole folder
        assert {Path(n).name for n in z.namelist()} >= {"config.json", "model.safetensors", "recipe.yaml"}
    drift = lab["cache"] / "drift" / "abc" / "config.json"
    drift.parent.mkdir(parents=True)
    drift.write_text("{}")  # what a DRIFT result leaves
    cache = lab["cache"]
    for path in (cache / "cache.db", export_dir / "model.safetensors", export_dir / "config.json",
                 export_dir / "recipe.yaml", drift, lab["root"] / "vlm" / "config.json", ROOT / "app.py"):
        assert path.is_file(), path
        assert fetch(lab["url"], path)[0] == 403, f"{path} is served"
    got = Path(recipe_file)
    text = got.read_text()  # this session's download, with no server path in it
    assert "method: linear" in text and str(ROOT) not in text
    if toy_dir.resolve().is_relative_to(ROOT):  # the bundled family (else a --smoke one in a temp folder)
        assert "vlm: assets/toy/vlm" in text and "relative to the merge lab's folder" in text
    assert not (cache / "recipes").exists()  # downloads never live in a servable lab folder


def _report(client, vlm: str) -> str:
    out = client.predict(preset_v=CUSTOM, vlm_v=vlm, reasoner_v="math", base_v="base", api_name="/check")
    return next(o for o in out if isinstance(o, str) and o.startswith("###"))


def test_hub_ids_resolve_only_through_the_hf_cache(lab, client, toy_dir):
    # a model folder at WORKDIR/tests/<name>: "tests/<name>" looks like a hub id and is outside the root
    name = f"hubjack-{uuid.uuid4().hex[:8]}"
    decoy = ROOT / "tests" / name
    decoy.symlink_to(toy_dir / "vlm", target_is_directory=True)
    try:
        report = _report(client, f"tests/{name}")
        assert report.startswith("#### Not usable here"), report
        assert "not a folder inside the models root" in report and "not in the local Hugging Face cache" in report
        status, *_ = client.predict(preset=CUSTOM, vlm=f"tests/{name}", reasoner="math", base="base",
                                    method="linear", api_name="/merge")
        assert "Cannot merge" in status, status
    finally:
        decoy.unlink()
    assert "Compatible" in _report(client, HUB_ID)  # control: the id in the Hugging Face cache
    status, recipe_yaml, *_ = client.predict(preset=CUSTOM, vlm=HUB_ID, reasoner="math", base="base",
                                             method="linear", knob1=0.2, api_name="/merge")
    assert "Merged with linear" in status, status
    # merged from the snapshot; the recipe shown and downloaded names the hub id, not the server's cache path
    assert f"vlm: {HUB_ID}\n" in recipe_yaml and str(lab["snapshot"]) not in recipe_yaml, recipe_yaml


def test_hub_resolver_never_looks_outside_the_cache(toy_dir, tmp_path, monkeypatch):
    """In process, on a real cache folder: a cwd folder named like the id is ignored, a doctored
    refs/main that leads out of the cache is refused."""
    import huggingface_hub.constants as c

    from merging.errors import LabError
    from merging.hub import resolve, resolve_hub_id

    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "toy-org/good", toy_dir / "base")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(toy_dir / "math", tmp_path / "toy-org" / "good")  # same name, working directory
    assert resolve_hub_id("toy-org/good") == snapshot.resolve()
    assert resolve("toy-org/good") == (tmp_path / "toy-org" / "good").resolve()  # the CLI's rule: local first
    shutil.copytree(toy_dir / "base", tmp_path / "toy-org" / "evil")
    with pytest.raises(LabError, match="toy-org/evil is not in the local Hugging Face cache"):
        resolve_hub_id("toy-org/evil")
    outside = tmp_path / "outside"
    shutil.copytree(toy_dir / "base", outside)
    repo = cache / "models--toy-org--doctored"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    (repo / "refs" / "main").write_text(os.path.relpath(outside, repo / "snapshots"))
    with pytest.raises(LabError, match="leads outside the Hugging Face cache"):
        resolve_hub_id("toy-org/doctored")
    for bad in ("../etc", "a/..", "a--b/c", "/abs/path"):
        with pytest.raises(LabError, match="is not a hub id"):
            resolve_hub_id(bad)


def test_uploaded_refuses_paths_outside_the_roots(tmp_path):
    from merging.errors import LabError
    from webapp.safety import check_images, uploaded

    roots = [tmp_path / "uploads"]
    inside = roots[0] / "h" / "a.png"
    _secret_png(inside)
    outside = tmp_path / "secret.png"
    _secret_png(outside)
    (roots[0] / "link.png").symlink_to(outside)
    assert uploaded(inside, roots) == str(inside)
    for bad in (outside, roots[0] / "link.png", roots[0] / ".." / "secret.png"):
        with pytest.raises(LabError, match=r"^file refused: \S+ was not uploaded to this app"):
            uploaded(bad, roots)
    with pytest.raises(LabError, match="secret.png was not uploaded"):
        check_images([str(inside), str(outside)], roots)
