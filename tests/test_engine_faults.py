"""Faults during a streaming merge: NaN inputs, a full disk, an interrupt. Nothing is left behind."""

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.factories import make_tiny_triple
from tests.paths import ENV, ROOT


def merge_cmd(recipe, out):
    return [sys.executable, "-m", "merging", "merge", str(recipe), str(out), "--no-progress"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, "." + out.name)))


@pytest.fixture()
def triple(tmp_path):
    tri = make_tiny_triple(tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"vlm: {tri['vlm']}\nreasoner: {tri['reasoner']}\nbase: {tri['base']}\n"
                      "method: task_arithmetic\nparameters: {alpha: 0.5}\n")
    return tri, recipe


def test_nan_in_an_input_is_named_and_never_written(triple, tmp_path):
    tri, recipe = triple
    f = tri["reasoner"] / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.self_attn.o_proj.weight"][3, 4] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    r = subprocess.run(merge_cmd(recipe, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "model.layers.1.self_attn.o_proj.weight" in line[0] and "reasoner" in line[0]
    assert "NaN or Inf" in line[0]
    assert leftovers(out) == []


def test_a_full_disk_leaves_nothing_and_says_so(triple, tmp_path):
    _, recipe = triple
    out = tmp_path / "out"

    def small_disk():  # the kernel refuses writes past 64 KB: as a full disk would, mid-shard
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = subprocess.run(merge_cmd(recipe, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
                       preexec_fn=small_disk)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "could not write" in line[0] and "nothing was written" in line[0]
    assert leftovers(out) == []


def test_an_interrupt_mid_merge_leaves_nothing(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    from make_synthetic import make_triple

    make_triple(tmp_path / "syn", "small")  # ~160 MB a model: a merge that takes a few seconds
    recipe = tmp_path / "syn" / "recipe_ties.yaml"
    out = tmp_path / "out"
    p = subprocess.Popen(merge_cmd(recipe, out), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(n.startswith(".out.tmp") for n in leftovers(out)):
        time.sleep(0.02)
    assert any(n.startswith(".out.tmp") for n in leftovers(out)), "the merge never started writing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted (SIGINT); nothing was written" in err, err[-3000:]
    assert leftovers(out) == []
