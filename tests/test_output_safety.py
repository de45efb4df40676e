"""No command destroys data: outputs never replace an input, a folder holding one, the working
directory, the home, system or cache folders or a foreign folder; bad arguments are one line.
Real files; the CLI through its main() in this process.
(Interrupts, SIGINT and SIGTERM at every instant of a write: tests/test_interrupts.py.)"""

import shutil
import subprocess
import sys
import time

import pytest

from tests.factories import make_tiny_triple
from tests.output_checks import ENV, ROOT, cli, leftovers, one_line, snapshot


@pytest.fixture(scope="module")
def tri(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    paths = make_tiny_triple(root / "m")
    recipe = root / "m" / "r.yaml"
    recipe.write_text(f"vlm: {paths['vlm']}\nreasoner: {paths['reasoner']}\nbase: {paths['base']}\n"
                      "method: task_arithmetic\nparameters: {alpha: 0.5}\n")
    return root, paths, recipe


@pytest.mark.parametrize("target, message", [
    ("vlm", "is (or holds) the input"), ("base", "is (or holds) the input"),
    ("holder", "is (or holds) the input"), ("inside", "is inside the input"),
])
def test_merge_overwrite_never_touches_an_input(tri, target, message):
    root, paths, recipe = tri
    out = {"holder": root / "m", "inside": paths["vlm"] / "sub"}.get(target) or paths[target]
    before = snapshot(root / "m")
    line = one_line(cli("merge", recipe, out, "--overwrite", "--no-progress"), 2, message)
    assert str(out) in line
    assert snapshot(root / "m") == before


def test_drift_never_writes_into_an_input(tri):
    root, paths, recipe = tri
    before = snapshot(root / "m")
    one_line(cli("drift", recipe, paths["vlm"], "--no-progress"), 2, "is (or holds) the input")
    one_line(cli("drift", recipe, root / "m"), 2, "is (or holds) the input")
    assert snapshot(root / "m") == before


@pytest.mark.parametrize("target", ["", ".", "..", "/"])
def test_merge_overwrite_never_touches_the_working_directory(tri, tmp_path, target):
    _, _, recipe = tri
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    one_line(cli("merge", recipe, target, "--overwrite", "--no-progress", cwd=work), 2,
             "empty" if target == "" else "working directory")
    assert snapshot(tmp_path) == before


def test_refused_output_paths(tri, tmp_path):
    _, paths, recipe = tri
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    one_line(cli("merge", recipe, link, "--no-progress"), 2, "symbolic link to a missing target", str(link))
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(cli("merge", recipe, afile, "--overwrite", "--no-progress"), 2, "exists and is not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    one_line(cli("merge", recipe, foreign, "--no-progress"), 2, "was not written by the lab")
    one_line(cli("merge", recipe, foreign, "--overwrite", "--no-progress"), 2, "was not written by the lab")
    assert (foreign / "thesis.tex").read_text() == "years of work"
    one_line(cli("merge", recipe, tmp_path / ("n" * 300), "--no-progress"), 2, "too long")
    one_line(cli("merge", tmp_path / ("r" * 300 + ".yaml"), tmp_path / "o", "--no-progress"), 2, "File name too long")
    long_ref = tmp_path / "ref.yaml"
    long_ref.write_text(recipe.read_text().replace(str(paths["vlm"]), "v" * 5000))
    one_line(cli("check", long_ref), 2, "File name too long")
    one_line(cli("merge", recipe, tmp_path / "o", "--device", "warp9", "--no-progress"), 2, "unknown device")
    one_line(cli("merge", recipe, tmp_path / "o", "--max-shard-size", "9" * 400, "--no-progress"), 2, "shard size")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling", "foreign", "ref.yaml"]


def test_report_never_deletes_a_model_or_a_foreign_folder(tri, tmp_path):
    root, paths, recipe = tri
    before = snapshot(root / "m")
    one_line(cli("report", recipe, paths["vlm"], module="analysis"), 2, "is (or holds) the input")
    one_line(cli("report", recipe, paths["vlm"], "--overwrite", module="analysis"), 2, "is (or holds) the input")
    one_line(cli("report", recipe, root, "--overwrite", module="analysis"), 2, "is (or holds) the input")
    assert snapshot(root / "m") == before
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    one_line(cli("report", recipe, foreign, module="analysis"), 2, "is not empty")
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8"


@pytest.mark.slow
def test_report_into_a_missing_parent_then_replaces_only_its_own(tri, tmp_path):
    _, _, recipe = tri
    out = tmp_path / "a" / "b" / "report"
    args = ("report", recipe, out, "--cache-dir", tmp_path / "cache")
    r = cli(*args, module="analysis")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "report.json").is_file() and leftovers(out) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".merge-lab-merged")]
    r = cli(*args, module="analysis")  # an earlier report is replaced without --overwrite
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "report.json").is_file() and leftovers(out) == []


def test_the_apps_per_layer_box_parser_refuses_alias_bombs_at_once():
    from merging.errors import LabError
    from merging.recipe import parse_yaml

    box = "a: &a [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    t0 = time.monotonic()
    with pytest.raises(LabError, match=r"per-layer values: YAML anchors and aliases .* \(line 1\)"):
        parse_yaml(box, "per-layer values")
    assert time.monotonic() - t0 < 1
    assert parse_yaml("alpha: [0.0, 0.2, 0.4]", "per-layer values") == {"alpha": [0.0, 0.2, 0.4]}


@pytest.mark.parametrize("args, message", [
    (("eval", "{vlm}", "--limit", "-1"), "must be at least 1"),
    (("eval", "{vlm}", "--limit", "0"), "must be at least 1"),
    (("report", "r.yaml", "out", "--knockout-limit", "-3"), "must be at least 1"),
    (("eval", "{vlm}", "--device", "cuda"), "CUDA is not available"),
    (("eval", "{badcfg}"), "could not load the model"),
    (("eval", "{badtok}"), "could not load the model"),
    (("eval", "{vlm}", "--suite", "poetry"), "unknown suite"),
])
def test_eval_and_report_bad_arguments_are_one_line(tmp_path, args, message):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    toy = ROOT / "assets" / "toy"
    badcfg, badtok = tmp_path / "badcfg", tmp_path / "badtok"
    for d in (badcfg, badtok):
        shutil.copytree(toy / "base", d)
    (badcfg / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (badtok / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    args = [a.format(vlm=toy / "vlm", badcfg=badcfg, badtok=badtok) for a in args]
    one_line(cli(*args, module="analysis", cwd=tmp_path), 2, message)


def test_app_refuses_an_empty_login():
    for auth in (":", "user:", ":pass", "nopass"):
        r = subprocess.run([sys.executable, "app.py", "--auth", auth], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "non-empty user and password" in r.stderr.strip().splitlines()[-1]


def test_the_home_folder_is_never_replaced_and_tilde_is_expanded_once(tri, tmp_path, monkeypatch):
    _, _, recipe = tri
    home = tmp_path / "home"  # a stand-in: HOME points here for this test
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    one_line(cli("merge", recipe, "~", "--overwrite", "--no-progress"), 2, "system, home or cache folder", str(home))
    one_line(cli("merge", recipe, home, "--overwrite", "--no-progress"), 2, "system, home or cache folder")
    assert snapshot(home) == before
    r = cli("merge", recipe, "~/newout", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (home / "newout" / "merge_report.json").is_file() and (home / "newout" / ".merge-lab").is_file()
    assert not (tmp_path / "~").exists() and not (ROOT / "~").exists()
    # the lab's own earlier output is replaced with --overwrite, and only then
    one_line(cli("merge", recipe, "~/newout", "--no-progress"), 2, "is not empty", "--overwrite")
    assert cli("merge", recipe, "~/newout", "--overwrite", "--no-progress").returncode == 0


@pytest.mark.parametrize("folder", ["/usr", "/etc", "/dev/shm", "/var", "/tmp", "/home", "/root"])
def test_system_folders_are_refused_before_anything_is_written(folder):
    # guard_output only checks (it writes nothing), so a wrong answer here fails without harm
    from merging.errors import LabError
    from merging.output_folder import guard_output

    for overwrite in (False, True):
        with pytest.raises(LabError, match="system, home or cache folder"):
            guard_output(folder, overwrite=overwrite)


def test_the_labs_cache_folder_is_refused(tri, tmp_path, monkeypatch):
    _, _, recipe = tri
    cache = tmp_path / "lab-cache"
    cache.mkdir()
    (cache / "cache.db").write_text("results")
    monkeypatch.setenv("MERGE_LAB_CACHE", str(cache))
    one_line(cli("merge", recipe, cache, "--overwrite", "--no-progress"), 2, "system, home or cache folder")
    assert (cache / "cache.db").read_text() == "results"
