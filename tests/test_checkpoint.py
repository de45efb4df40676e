"""Reading checkpoints: single-file vs sharded, hub cache, refusals, corruption, fingerprints."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.checkpoint import Checkpoint
from merging.errors import LabError
from tests.factories import make_tiny_triple, reshard


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return make_tiny_triple(tmp_path_factory.mktemp("ck"))


def test_sharded_reads_identically_to_single_file(triple, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(triple["vlm"], sharded)
    reshard(sharded, 3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    with Checkpoint.open(triple["vlm"]) as a, Checkpoint.open(sharded) as b:
        assert a.names() == b.names()
        assert len(b.files()) == 3
        for n in a.names():
            assert a.shape(n) == b.shape(n) and a.dtype(n) == b.dtype(n)
            assert torch.equal(a.get(n), b.get(n)), n


def test_metadata_without_reading_weights(triple):
    with Checkpoint.open(triple["base"]) as ck:
        n = "model.layers.0.mlp.up_proj.weight"
        assert ck.shape(n) == (64, 32) and ck.dtype(n) == torch.float32
        assert ck.nbytes(n) == 64 * 32 * 4
        with pytest.raises(LabError, match="not found"):
            ck.get("model.layers.9.nothing")


def test_fingerprint_is_stable_and_sees_changed_weights(triple, tmp_path):
    with Checkpoint.open(triple["base"]) as a, Checkpoint.open(triple["base"]) as b:
        assert a.fingerprint == b.fingerprint
    copy = tmp_path / "changed"
    shutil.copytree(triple["base"], copy)
    sd = load_file(copy / "model.safetensors")
    sd = {k: (v + 1 if k == "model.norm.weight" else v) for k, v in sd.items()}
    save_file(sd, copy / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint.open(triple["base"]) as a, Checkpoint.open(copy) as b:
        assert a.names() == b.names()
        assert a.fingerprint != b.fingerprint


def test_bin_checkpoints_refused_unless_allowed(triple, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(triple["base"] / "config.json", folder)
    sd = load_file(triple["base"] / "model.safetensors")
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(LabError, match="pickle"):
        Checkpoint.open(folder)
    with Checkpoint.open(folder, allow_bin=True) as ck:
        assert ck.names() == sorted(sd)
        assert torch.equal(ck.get("model.norm.weight"), sd["model.norm.weight"])


def test_missing_config_truncated_file_and_missing_shard(triple, tmp_path):
    nocfg = tmp_path / "nocfg"
    shutil.copytree(triple["base"], nocfg)
    (nocfg / "config.json").unlink()
    with pytest.raises(LabError, match="no config.json"):
        Checkpoint.open(nocfg)

    trunc = tmp_path / "trunc"
    shutil.copytree(triple["base"], trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LabError, match="truncated"):
        Checkpoint.open(trunc)

    garbage = tmp_path / "garbage"
    shutil.copytree(triple["base"], garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(LabError, match="not valid JSON"):
        Checkpoint.open(garbage)

    shards = tmp_path / "shards"
    shutil.copytree(triple["base"], shards)
    reshard(shards, 2)
    next(shards.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LabError, match="missing shard: model-00002-of-00002.safetensors"):
        Checkpoint.open(shards)

    with pytest.raises(LabError, match="model folder not found: /no/such/folder"):
        Checkpoint.open("/no/such/folder")


def _fake_hub_cache(cache, repo_id, source):
    """Lay a model folder out as huggingface_hub's cache does (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_hub_ids_resolve_through_the_local_cache_only(triple, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "toy-org/tiny-base", triple["base"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    with Checkpoint.open("toy-org/tiny-base") as ck, Checkpoint.open(triple["base"]) as ref:
        assert ck.fingerprint == ref.fingerprint
    with pytest.raises(LabError, match="toy-org/not-downloaded is not in the local Hugging Face cache"):
        Checkpoint.open("toy-org/not-downloaded")


def test_index_that_is_not_json(triple, tmp_path):
    shards = tmp_path / "badindex"
    shutil.copytree(triple["base"], shards)
    reshard(shards, 2)
    (shards / "model.safetensors.index.json").write_text(json.dumps({"nothing": 1}))
    with pytest.raises(LabError, match="no weight_map"):
        Checkpoint.open(shards)


def _write_header(folder, header: dict | list | str, data: bytes = b"\0" * 64):
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)


F32_8 = {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}


@pytest.mark.parametrize("header, message", [
    ({"a": {**F32_8, "shape": [-8]}}, "bad header entry (shape"),
    ({"a": {**F32_8, "shape": [8.0]}}, "bad header entry (shape"),
    ({"a": {**F32_8, "shape": "8"}}, "bad header entry (shape"),
    ({"a": {**F32_8, "shape": [True] * 8}}, "bad header entry (shape"),
    ({"a": {**F32_8, "data_offsets": ["0", "32"]}}, "bad header entry (data_offsets"),
    ({"a": {**F32_8, "data_offsets": [0]}}, "bad header entry (data_offsets"),
    ({"a": {**F32_8, "data_offsets": None}}, "bad header entry (data_offsets"),
    ({"a": {**F32_8, "dtype": ["F32"]}}, "bad header entry (dtype"),
    ({"a": "not an entry"}, "bad header entry (dtype"),
    ({"a": F32_8, "b": {**F32_8, "data_offsets": [16, 48]}}, "share bytes"),
    ([1, 2, 3], "not a JSON object"),
    ('{"a": ' * 5000 + "1" + "}" * 5000, "not valid JSON"),
    ('{"a": "\udcff"}', "not valid JSON"),
])
def test_malformed_header_values_are_one_line_errors(triple, tmp_path, header, message):
    folder = tmp_path / "m"
    shutil.copytree(triple["base"], folder)
    if isinstance(header, str) and "\udcff" in header:
        raw = b'{"a": "\xff"}'
        (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
    else:
        _write_header(folder, header)
    with pytest.raises(LabError, match=re.escape(message)):
        Checkpoint.open(folder)


@pytest.mark.parametrize("config, message", [
    (b'{"model_type": "llama",', "config.json is not valid JSON"),
    (b'{"model_type": "ll\xe9ma"}', "config.json is not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
])
def test_bad_config_json_is_one_line(triple, tmp_path, config, message):
    folder = tmp_path / "m"
    shutil.copytree(triple["base"], folder)
    (folder / "config.json").write_bytes(config)
    with pytest.raises(LabError, match=re.escape(message)):
        Checkpoint.open(folder)


@pytest.mark.parametrize("weight_map", [{"a": 5}, {"a": "../outside.safetensors"}, {"a": "/etc/x.safetensors"}])
def test_index_naming_a_shard_outside_the_folder(triple, tmp_path, weight_map):
    shards = tmp_path / "badindex"
    shutil.copytree(triple["base"], shards)
    reshard(shards, 2)
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LabError, match="not a file name in the folder"):
        Checkpoint.open(shards)
