"""Who can reach the app and what it may load, against the real app (python app.py in a subprocess).

Host binding and the exposure warning, --auth, --models-root escapes, .bin (pickle) weights and
trust_remote_code (never on unless the operator passes --trust-remote-code).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app_fixtures import ROOT, start_app, stop_app
from webapp.presets import CUSTOM

pytestmark = pytest.mark.slow
USER, PASSWORD = "lab", "s3cret-pass"
EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")


class EvilConfig:
    pass


class EvilModel:
    pass
"""


def _evil_copy(src: Path, dst: Path, marker: Path, model_type: str | None = None) -> Path:
    """A copy of a model folder whose config asks transformers to import evil.py (which writes marker)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel",
                       "AutoModelForCausalLM": "evil.EvilModel", "AutoProcessor": "evil.EvilModel"}
    if model_type:
        cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return dst


class _OpenOnLoad:  # unpickling this creates a file: what a malicious .bin can do
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def models_root(toy_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models_root")
    _evil_copy(toy_dir / "vlm", root / "vlm", root.parent / "MARKER_app")
    for name in ("math", "base"):
        shutil.copytree(toy_dir / name, root / name)
    (root / "binmodel").mkdir()
    shutil.copy(toy_dir / "math" / "config.json", root / "binmodel" / "config.json")
    with open(root / "binmodel" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _OpenOnLoad(str(root.parent / "MARKER_bin"))}, f)
    (root / "escape").symlink_to(toy_dir)  # a link out of the root
    (root / "nested").mkdir()
    (root / "nested" / "vlm").symlink_to(toy_dir / "vlm")
    return root


@pytest.fixture(scope="module")
def secured(toy_dir, models_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    proc, url = start_app(toy_dir, tmp / "cache", tmp / "app.log",
                          ["--auth", f"{USER}:{PASSWORD}", "--models-root", str(models_root)])
    yield proc, url, tmp / "app.log"
    stop_app(proc)


@pytest.fixture(scope="module")
def client(secured):
    from gradio_client import Client

    return Client(secured[1], auth=(USER, PASSWORD), verbose=False)


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on this port."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                out.add(local.rsplit(":", 1)[0])
    return out


def test_binds_loopback_by_default_and_warns_when_exposed(secured, toy_dir, tmp_path):
    from app import exposure_warnings, parse_args

    assert parse_args([]).host == "127.0.0.1"
    assert _listening(int(secured[1].rstrip("/").rsplit(":", 1)[1])) == {"0100007F"}  # 127.0.0.1 only
    assert "WARNING" not in secured[2].read_text()
    assert exposure_warnings("127.0.0.1", None) == [] and exposure_warnings("0.0.0.0", "a:b") == []
    (line,) = exposure_warnings("0.0.0.0", None)
    assert line.startswith("WARNING: listening on 0.0.0.0 without --auth")
    proc, url = start_app(toy_dir, tmp_path / "cache", tmp_path / "open.log", ["--host", "0.0.0.0"])
    try:
        assert _listening(int(url.rstrip("/").rsplit(":", 1)[1])) == {"00000000"}
        assert line in (tmp_path / "open.log").read_text()
    finally:
        stop_app(proc)


def test_auth_is_required(secured, client):
    from gradio_client import Client

    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different types per version
        Client(secured[1], verbose=False).predict(api_name="/check_preset")
    with pytest.raises(Exception):  # noqa: B017
        Client(secured[1], auth=(USER, "wrong"), verbose=False)
    assert "Compatible" in _report(client, "vlm", "math", "base")


def _report(client, vlm, reasoner, base) -> str:
    out = client.predict(preset_v=CUSTOM, vlm_v=vlm, reasoner_v=reasoner, base_v=base, api_name="/check")
    return next(o for o in out if isinstance(o, str) and o.startswith("###"))


def test_models_root_refuses_escapes(client, models_root, toy_dir):
    cases = {"../x": "'..' is not allowed", "vlm/../../x": "'..' is not allowed",
             str(toy_dir / "vlm"): "outside the models root", "escape/vlm": "leads outside the models root",
             "nested/vlm": "leads outside the models root", "no_such_folder": "not a folder inside"}
    for ref, expected in cases.items():
        report = _report(client, ref, "math", "base")
        assert report.startswith("#### Not usable here") and expected in report, (ref, report)
    assert "Compatible" in _report(client, str(models_root / "vlm"), "math", "base")  # absolute, inside


def test_bin_weights_refused(client, models_root):
    report = _report(client, "vlm", "binmodel", "base")
    assert report.startswith("#### Not usable here") and ".bin (pickle)" in report, report
    status, *_ = client.predict(preset=CUSTOM, vlm="vlm", reasoner="binmodel", base="base", method="linear",
                                api_name="/merge")
    assert "Cannot merge" in status, status
    assert not (models_root.parent / "MARKER_bin").exists()


def test_trust_remote_code_off_by_default_in_app(client, models_root):
    status, *_ = client.predict(preset=CUSTOM, vlm="vlm", reasoner="math", base="base", method="linear",
                                knob1=0.2, api_name="/merge")
    assert "Merged with linear" in status, status  # loaded with the built-in class, auto_map ignored
    assert not (models_root.parent / "MARKER_app").exists()


def test_trust_remote_code_needs_the_flag(toy_dir, tmp_path):
    from app import parse_args
    from merging.errors import LabError
    from merging.loading import load_model

    assert parse_args([]).trust_remote_code is False and parse_args(["--trust-remote-code"]).trust_remote_code
    marker = tmp_path / "MARKER"
    folder = _evil_copy(toy_dir / "vlm", tmp_path / "custom", marker, model_type="evil_lab_model")
    with pytest.raises(LabError, match="--trust-remote-code"):
        load_model(str(folder), "cpu")
    assert not marker.exists()
    code = (f"from merging.loading import load_model\ntry:\n    load_model({str(folder)!r}, 'cpu', "
            "trust_remote_code=True)\nexcept Exception:\n    pass")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True,
                   env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert marker.exists(), "with the flag the model's own code is what loads it (control)"
