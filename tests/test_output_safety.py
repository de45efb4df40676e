"""No command destroys data: outputs never replace an input, a folder holding one, the working
directory or a foreign folder; --overwrite is safe at every instant; SIGINT and SIGTERM leave no
temp folder. Real files, real CLI subprocesses, real signals."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factories import make_tiny_triple


@pytest.fixture(autouse=True)
def plain_signals():
    """These tests send SIGINT/SIGTERM to this process and to children, which inherit the signal
    mask and ignored signals. pytest started as a background job of a non-interactive shell (as CI
    may start it) has SIGINT ignored from the first test on; none of the first 299 tests of a full run
    (this file and every app and browser test among them) changes either (session 6, a plugin that
    printed both after each test). Start each test from Python's
    defaults and put back what was there."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
    handlers = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def cli(*args, cwd=ROOT, module="merging", timeout=300):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line(r, code: int, *parts: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def snapshot(folder) -> list:
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*"))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith("." + out.name))


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
    one_line(cli("merge", recipe, foreign, "--no-progress"), 2, "is not empty", "--overwrite")
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


def _start_and_wait_for_tmp(cmd, out: Path, cwd=ROOT) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", *map(str, cmd)], cwd=cwd, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not any(n.startswith(f".{out.name}.tmp") for n in leftovers(out)):
        if p.poll() is not None:
            pytest.fail(f"finished before it started writing: {p.stderr.read()[-3000:]}")
        time.sleep(0.02)
    assert any(n.startswith(f".{out.name}.tmp") for n in leftovers(out)), "it never started writing"
    return p


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    from make_synthetic import make_triple

    root = tmp_path_factory.mktemp("syn")
    make_triple(root, "small", llm_vlm=False, layers=4)  # ~110 MB a model: a merge of a few seconds
    return root / "recipe_ties.yaml"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_overwrite_interrupted_mid_merge_keeps_the_old_output(syn, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):
        (out / f"old-{i}.txt").write_text(f"old output {i}")
    before = snapshot(out)
    p = _start_and_wait_for_tmp(("merging", "merge", syn, out, "--overwrite", "--no-progress"), out)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"error: interrupted ({signal.Signals(sig).name}); "
                                            f"nothing was written; {out} is as it was")
    assert "Traceback" not in err
    assert snapshot(out) == before and leftovers(out) == []


def test_interrupt_mid_report_leaves_nothing(tmp_path):
    toy = ROOT / "assets" / "toy"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"vlm: {toy / 'vlm'}\nreasoner: {toy / 'math'}\nbase: {toy / 'base'}\n"
                      "method: linear\nparameters: {alpha: 0.1}\n")
    out = tmp_path / "report"
    p = _start_and_wait_for_tmp(("analysis", "report", recipe, out, "--knockout", "--cache-dir",
                                 tmp_path / "cache"), out)
    time.sleep(0.5)  # inside the analyses, not only the folder set-up
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted (SIGINT); nothing was written"
    assert "Traceback" not in err
    assert not out.exists() and leftovers(out) == []


# A child that replaces OUT with --overwrite semantics again and again: any instant may be hit.
_LOOP = """
import itertools, sys
from pathlib import Path
from merging.cli import run
from merging.writer import AtomicFolder
out = Path(sys.argv[1])
def loop():
    for i in itertools.count():
        with AtomicFolder(out, overwrite=True) as tmp:
            for k in range(30):
                (tmp / f"f{k}").write_text(str(i))
        print(i, flush=True)
sys.exit(run(loop, str(out)))
"""


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.029, 0.047])
def test_overwrite_is_safe_at_every_instant(tmp_path, delay):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", _LOOP, str(out)], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "0", p.stderr.read()  # one complete version exists
    time.sleep(delay)
    sig = signal.SIGINT if int(delay * 1000) % 2 else signal.SIGTERM
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    assert leftovers(out) == []  # no temp folder, no old folder set aside
    values = {f.read_text() for f in out.iterdir() if f.name.startswith("f")}
    assert len(list(out.glob("f*"))) == 30 and len(values) == 1  # one whole version, never a mix


# A child that replaces OUT and sends itself SIGINT at the n-th line of the commit (the renames
# and the deletion of the old version), for every n; after each it reports what is on disk.
_INSTANTS = """
import json, os, signal, sys
from pathlib import Path
from merging.writer import AtomicFolder
out = Path(sys.argv[1])
state = {"n": 0, "at": 0}
def local(frame, event, arg):
    if event == "line":
        state["n"] += 1
        if state["n"] == state["at"]:
            os.kill(os.getpid(), signal.SIGINT)
    return local
def tracer(frame, event, arg):
    return local if frame.f_code is AtomicFolder._commit.__code__ else None
def version(i):
    with AtomicFolder(out, overwrite=True) as tmp:
        for k in range(30):
            (tmp / f"f{k}").write_text(str(i))
version(0)
for at in range(1, 16):
    state.update(n=0, at=at)
    interrupted = False
    sys.settrace(tracer)
    try:
        version(at)
    except KeyboardInterrupt:
        interrupted = True
    sys.settrace(None)
    files = sorted(out.iterdir()) if out.is_dir() else []
    print(json.dumps({"at": at, "interrupted": interrupted, "lines": state["n"],
                      "siblings": sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out")),
                      "names": [f.name for f in files], "values": sorted({f.read_text() for f in files
                                                                            if f.name.startswith("f")})}))
"""


def _rows_of(script: str, out: Path) -> list[dict]:
    """Run a child script on OUT; one JSON row per line of its output (one per instant it signalled)."""
    import json

    r = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_a_signal_at_each_line_of_the_commit_leaves_one_whole_version(tmp_path):
    rows = _rows_of(_INSTANTS, tmp_path / "out")
    hit = [row for row in rows if row["at"] <= row["lines"]]
    assert len(hit) >= 5 and all(row["interrupted"] for row in hit)  # every line of the commit was hit
    for row in rows:
        assert row["siblings"] == [], row  # no temp folder, no old folder set aside
        assert len([n for n in row["names"] if n.startswith("f")]) == 30 and len(row["values"]) == 1, row


# The same, through the CLI's run(), with SIGINT or SIGTERM at every call and every line of the
# whole write (entering the temp folder, the body, leaving it, the commit, the signal deferral):
# the first instruction of __exit__ included, where no clean-up of AtomicFolder's own can run.
_EVERYWHERE = """
import json, os, signal, sys
from pathlib import Path
from merging.cli import run
from merging.writer import AtomicFolder, deferred_signals
out = Path(sys.argv[1])
state = {"n": 0, "at": 0, "sig": signal.SIGINT}
def version(i):
    with AtomicFolder(out, overwrite=True) as tmp:
        for k in range(3):
            (tmp / f"f{k}").write_text(str(i))
    return 0
CODES = {f.__code__ for f in (version, AtomicFolder.__enter__, AtomicFolder.__exit__, AtomicFolder._commit,
                              AtomicFolder._discard, deferred_signals.__enter__, deferred_signals.__exit__,
                              deferred_signals._put_back)}
def tick():
    state["n"] += 1
    if state["n"] == state["at"]:
        os.kill(os.getpid(), state["sig"])
def local(frame, event, arg):
    if event == "line":
        tick()
    return local
def tracer(frame, event, arg):
    if frame.f_code in CODES:
        tick()  # the call itself: the instant before the function's first line
        return local
    return None
version(0)
for at in range(1, 400):
    state.update(n=0, at=at, sig=(signal.SIGINT, signal.SIGTERM)[at % 2])
    sys.settrace(tracer)
    rc = run(lambda: version(at), str(out))
    sys.settrace(None)
    files = sorted(out.iterdir()) if out.is_dir() else []
    print(json.dumps({"at": at, "rc": rc, "lines": state["n"], "handlers": [
                          signal.getsignal(s) is h for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                                (signal.SIGTERM, signal.SIG_DFL))],
                      "siblings": sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out")),
                      "names": [f.name for f in files], "values": sorted({f.read_text() for f in files
                                                                            if f.name.startswith("f")})}))
    if at > state["n"]:
        break
"""


def test_a_signal_at_any_instant_of_a_write_leaves_one_whole_version_and_no_temp_folder(tmp_path):
    rows = _rows_of(_EVERYWHERE, tmp_path / "out")
    hit = [row for row in rows if row["at"] <= row["lines"]]
    assert len(hit) >= 40, len(hit)  # every call and line of the write was hit, one per run
    assert all(row["rc"] == (130, 143)[row["at"] % 2] for row in hit), [row for row in hit if row["rc"] not in (130, 143)]
    assert rows[-1]["rc"] == 0  # the run past the last instant: not interrupted
    values = set()
    for row in rows:
        assert row["siblings"] == [], row  # no temp folder, no old folder set aside
        assert len([n for n in row["names"] if n.startswith("f")]) == 3 and len(row["values"]) == 1, row
        assert row["handlers"] == [True, True], row  # run() and the deferral put every handler back
        values |= set(row["values"])
    assert len(values) > 2  # some runs did replace the output (a test that never commits proves nothing)


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


def test_deferred_signals_wait_for_the_block_then_act():
    from merging.writer import deferred_signals

    reached = []
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        reached.append("the block finished")
    assert reached == ["the block finished"]


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
