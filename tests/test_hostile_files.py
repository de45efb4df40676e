"""Special and hostile files in a model folder, on real files.

A FIFO, links to /dev/zero and to files outside the folder, an index leading out of it, a config
claiming 10**9 layers, crafted safetensors headers: each is a one-line LabError naming the file at
fault, at once (a FIFO must not hang `check`), and no message ever shows what an outside file holds.
The CLI runs in a subprocess with a timeout; one check goes through the real app's `/check`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from merging.checkpoint import Checkpoint
from merging.errors import LabError
from merging.writer import SIDE_FILE_MAX
from tests.factories import make_tiny_triple, reshard
from tests.output_checks import cli, one_line
from tests.paths import ENV, ROOT

SECRET = b"S3CR3T!!"  # the first 8 bytes of an outside file: read as a header length they are this number
SECRET_N = struct.unpack("<Q", SECRET)[0]


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return make_tiny_triple(tmp_path_factory.mktemp("hostile"))


def _copy(triple, role, dst: Path) -> Path:
    shutil.copytree(triple[role], dst)
    return dst


def _recipe(triple, tmp_path, reasoner=None, vlm=None) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"vlm: {vlm or triple['vlm']}\nreasoner: {reasoner or triple['reasoner']}\n"
                      f"base: {triple['base']}\nmethod: task_arithmetic\nparameters: {{alpha: 0.5}}\n")
    return recipe


def _cli(cmd: str, triple, tmp_path, reasoner=None, vlm=None, out=None, timeout=90):
    recipe = _recipe(triple, tmp_path, reasoner, vlm)
    args = [sys.executable, "-m", "merging", cmd, str(recipe)] + ([str(out), "--no-progress"] if out else [])
    r = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    return r, r.stderr.strip().splitlines()


def _outside(tmp_path) -> Path:
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(SECRET + b"private data of another user" * 10)
    return secret


def _never_echoed(text: str) -> None:
    for leak in (SECRET.decode(), str(SECRET_N), "private data", "outside/secret"):
        assert leak not in text, (leak, text)


# -- the CLI: a FIFO must not hang it ------------------------------------------------------------
@pytest.mark.parametrize("where", ["model.safetensors", "shard", "config.json", "index"])
def test_a_fifo_in_the_model_folder_is_refused_at_once(triple, tmp_path, where):
    bad = _copy(triple, "reasoner", tmp_path / "fifo")
    if where in ("shard", "index"):
        reshard(bad, 2)
    name = {"model.safetensors": "model.safetensors", "shard": "model-00002-of-00002.safetensors",
            "config.json": "config.json", "index": "model.safetensors.index.json"}[where]
    (bad / name).unlink()
    os.mkfifo(bad / name)
    r, lines = _cli("check", triple, tmp_path, reasoner=bad, timeout=60)  # a hang is a TimeoutExpired
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines == [f"error: reasoner: {bad / name} is a FIFO, not a regular file; refused"], r.stderr


def test_a_link_to_a_fifo_inside_the_folder_is_refused_too(triple, tmp_path):
    bad = _copy(triple, "reasoner", tmp_path / "fifo")
    os.mkfifo(bad / ".pipe")
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").symlink_to(bad / ".pipe")
    with pytest.raises(LabError, match=re.escape(f"{bad / 'model.safetensors'} is a FIFO, not a regular file")):
        Checkpoint.open(bad)


@pytest.mark.parametrize("how", ["index", "single", "dev_zero"])
def test_weights_leading_outside_the_folder_are_refused_unread(triple, tmp_path, how):
    secret = _outside(tmp_path)
    bad = _copy(triple, "reasoner", tmp_path / "bad")
    if how == "index":  # a plain shard name in the index, a link out of the folder on disk
        reshard(bad, 2)
        shard = bad / "model-00002-of-00002.safetensors"
    else:
        shard = bad / "model.safetensors"
    shard.unlink()
    shard.symlink_to("/dev/zero" if how == "dev_zero" else secret)
    r, lines = _cli("check", triple, tmp_path, reasoner=bad, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines == [f"error: reasoner: {shard} leads outside the model folder {bad}; refused"], r.stderr
    _never_echoed(r.stdout + r.stderr)


def test_the_header_length_is_never_shown(triple, tmp_path):
    """A file inside the folder whose first 8 bytes are not a sane header length."""
    bad = _copy(triple, "reasoner", tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(SECRET + b"\0" * 64)
    with pytest.raises(LabError) as e:
        Checkpoint.open(bad)
    assert "its header length exceeds the file" in str(e.value)
    _never_echoed(str(e.value))


# -- config numbers against the tensors present --------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"].update(num_hidden_layers=10**9),
     "config.json says num_hidden_layers 1000000000 but the weights have decoder layers 0..1; refused"),
    (lambda c: c["text_config"].update(num_hidden_layers="2"),
     "config.json says num_hidden_layers a non-integer but the weights have decoder layers 0..1; refused"),
    (lambda c: c["text_config"].update(hidden_size=10**9),
     "config.json says hidden_size 1000000000 but the language model's tensors are 32 wide; refused"),
    (lambda c: c["vision_config"].update(num_hidden_layers=10**9),
     "config.json: vision_config.num_hidden_layers must be a whole number from 0 to the number of tensors"),
    (lambda c: c["text_config"].update(intermediate_size=10**12),
     "config.json: text_config.intermediate_size must be a whole number from 0 to the largest tensor dimension"),
    (lambda c: c["vision_config"].update(image_size=-32),
     "config.json: vision_config.image_size must be a whole number"),
    (lambda c: c["text_config"].update(vocab_size=2.5),
     "config.json: text_config.vocab_size must be a whole number"),
])
def test_config_numbers_are_checked_against_the_tensors(triple, tmp_path, edit, message):
    bad = _copy(triple, "vlm", tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg)
    (bad / "config.json").write_text(json.dumps(cfg))
    r, lines = _cli("check", triple, tmp_path, vlm=bad, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: vlm: {bad}/") and message in lines[0], r.stderr


def test_a_tensor_of_layer_ten_to_the_nine_is_refused_at_once(triple, tmp_path):
    """max(layer) + 1 = 10**9 + 1 layers: finding the first missing one must not build that range."""
    bad = _copy(triple, "reasoner", tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1000000000.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].clone()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    r, lines = _cli("check", triple, tmp_path, reasoner=bad, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines == [f"error: reasoner: {bad}: decoder layer 2 has no tensors (layers 0..1000000000 expected)"]


def _header_file(folder: Path, header: dict, data: bytes = b"\0" * 64) -> None:
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("shape, part", [
    ([-8], "shape"), ([8.0], "shape"), ([2, -4], "shape"), ([2**40, 2**40], "byte range"),
])
def test_crafted_shapes_through_the_cli(triple, tmp_path, shape, part):
    bad = _copy(triple, "reasoner", tmp_path / "bad")
    _header_file(bad, {"model.norm.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 32]}})
    r, lines = _cli("check", triple, tmp_path, reasoner=bad, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and f"{bad}/model.safetensors is corrupt: tensor 'model.norm.weight'" in lines[0]
    assert part in lines[0], lines


# -- side files: confined, regular, bounded --------------------------------------------------------
def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, "." + out.name)))


@pytest.mark.parametrize("how", ["dev_zero", "outside", "fifo", "huge"])
def test_hostile_side_files_stop_the_merge_before_any_weight(triple, tmp_path, how):
    vlm = _copy(triple, "vlm", tmp_path / "vlm")
    side = vlm / "tokenizer.json"
    side.unlink(missing_ok=True)
    message = f"error: side file {side} leads outside the model folder {vlm}; refused"
    if how == "dev_zero":
        side.symlink_to("/dev/zero")  # used to be copied without bound
    elif how == "outside":
        side.symlink_to(_outside(tmp_path))  # used to be copied into the output, then served by the export
    elif how == "fifo":
        os.mkfifo(side)
        message = f"error: side file {side} is a FIFO, not a regular file; refused"
    else:
        with open(side, "wb") as f:  # sparse: over the bound without writing a gigabyte
            f.truncate(SIDE_FILE_MAX + 1)
        message = f"error: side file {side} is 1024 MB: past the 1024 MB per file or 2048 MB in all"
    out = tmp_path / "merged"
    r, lines = _cli("merge", triple, tmp_path, vlm=vlm, out=out, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert _leftovers(out) == []
    _never_echoed(r.stdout + r.stderr)


def test_a_hub_snapshot_whose_files_link_into_its_blobs_merges(triple, tmp_path):
    """Control: the Hugging Face cache layout (snapshot files are links to ../../blobs/<hash>) is
    inside the model's own tree and is read and copied as before."""
    from merging.engine import merge_to_disk
    from merging.recipe import from_dict

    repo = tmp_path / "hub" / "models--toy--vlm"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(triple["vlm"].iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    with Checkpoint.open(snap) as a, Checkpoint.open(triple["vlm"]) as b:
        assert a.names() == b.names() and a.fingerprint == b.fingerprint
    rec = from_dict({"vlm": str(snap), "reasoner": str(triple["reasoner"]), "base": str(triple["base"]),
                            "method": "task_arithmetic", "parameters": {"alpha": 0.5}})
    out = merge_to_disk(rec, tmp_path / "out")
    assert (out / "config.json").read_bytes() == (triple["vlm"] / "config.json").read_bytes()
    assert not (out / "config.json").is_symlink()


# -- the real app: /check with a FIFO under the models root --------------------------------------
@pytest.mark.slow
def test_the_apps_check_refuses_a_fifo_and_keeps_serving(toy_dir, tmp_path):
    from gradio_client import Client

    from tests.app_fixtures import start_app, stop_app
    from webapp.presets import CUSTOM

    root = tmp_path / "root"
    for name in ("vlm", "math", "base"):
        shutil.copytree(toy_dir / name, root / name)
    shutil.copytree(toy_dir / "math", root / "piped")
    (root / "piped" / "model.safetensors").unlink()
    os.mkfifo(root / "piped" / "model.safetensors")
    proc, url = start_app(toy_dir, tmp_path / "cache", tmp_path / "app.log", ["--models-root", str(root)])
    try:
        client = Client(url, verbose=False)

        def report(reasoner: str) -> str:
            job = client.submit(preset_v=CUSTOM, vlm_v="vlm", reasoner_v=reasoner, base_v="base", api_name="/check")
            return next(o for o in job.result(timeout=60) if isinstance(o, str) and o.startswith("###"))

        bad = report("piped")
        assert bad.startswith("#### Not usable here") and "model.safetensors is a FIFO, not a regular file; refused" in bad, bad
        assert "Compatible" in report("math")  # the app was not wedged: the next user's check works
    finally:
        stop_app(proc)



def test_a_nul_in_an_index_shard_name_is_never_printed_raw(triple, tmp_path):
    """A shard name holding a NUL (and an escape sequence) in the index: the one-line error writes them as
    escapes; no raw control byte reaches the terminal."""
    bad = _copy(triple, "reasoner", tmp_path / "bad")
    reshard(bad, 2)
    index = bad / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-0000\u00001-of\u001b[31m.safetensors"
    index.write_text(json.dumps(data))
    r = cli("check", _recipe(triple, tmp_path, bad))
    line = one_line(r, 2, "reasoner: ", "names a missing shard: model-0000\\x001-of\\x1b[31m.safetensors")
    assert not any(ord(c) < 32 for c in r.stderr.replace("\n", "")), repr(r.stderr)
    assert "\\x00" in line
