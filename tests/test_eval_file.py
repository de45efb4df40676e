"""`python -m analysis eval MODEL --suite-file items.jsonl`: a user's own eval set, checked whole before
any model loads (line numbers, image paths kept inside the file's folder), scored like the bundled suites."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from analysis.eval_file import read_items
from analysis.evaluate import evaluate, load_model
from merging import item_file
from merging.errors import LabError
from tests.output_checks import cli
from tests.paths import ROOT, TOY

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def bundled(suite: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (TOY / "eval" / f"{suite}.jsonl").read_text().splitlines()[:n]]


def write_set(folder: Path, rows: list, name: str = "items.jsonl", copy: bool = True) -> Path:
    """rows (dicts or raw text lines) as a JSONL in folder, with the bundled images they name copied beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in rows:
        if copy and isinstance(r, dict) and r.get("image") and (TOY / "eval" / r["image"]).is_file():
            (folder / r["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(TOY / "eval" / r["image"], folder / r["image"])
        lines.append(r if isinstance(r, str) else json.dumps(r))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def refusal(path: Path, **kw) -> str:
    with pytest.raises(LabError) as e:
        read_items(path, **kw)
    return str(e.value)


GOOD = {"question": "how many circles are there ?", "answer": "3"}


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not JSON"),
    ('["a list"]', "not a JSON object but list"),
    ('{"answer": "3"}', '"question" is missing'),
    ('{"question": "  ", "answer": "3"}', '"question" is empty'),
    ('{"question": "q", "answer": ""}', '"answer" is empty'),
    ('{"question": "q", "answer": 3}', '"answer" must be a string, not int (write "3", not 3)'),
    ('{"question": ["q"], "answer": "3"}', '"question" must be a string, not list'),
    ('{"question": "q", "answer": "3", "image": 5}', '"image" must be a path string or null, not int'),
    ('{"question": "q", "answer": "3", "id": {"a": 1}}', '"id" must be a string or a whole number'),
    ('{"question": "q", "answer": "3", "image": "images/nope.png"}', '"image" \'images/nope.png\' is not there'),
])
def test_a_bad_line_is_named_with_its_number(tmp_path, bad, why):
    path = write_set(tmp_path, [GOOD, "", GOOD, bad, GOOD])  # the blank line still counts
    msg = refusal(path)
    assert msg == f"{path} line 4: {why}" or msg.startswith(f"{path} line 4: {why}"), msg
    assert "\n" not in msg


def test_image_paths_stay_inside_the_files_folder(tmp_path):
    outside = tmp_path / "secret.png"
    shutil.copy(TOY / "eval" / "images" / "perception_0000.png", outside)
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "link.png").symlink_to(outside)
    (folder / "images" / "text.png").write_text("not an image")
    cases = {
        str(outside): "is an absolute path",
        "../secret.png": "goes up out of the JSONL's folder (..)",
        "images/../../secret.png": "goes up out of the JSONL's folder (..)",
        "images/link.png": "is a link that leads out of the JSONL's folder",
        "images/text.png": "image text.png is not a readable image",
        "C:\\x.png": "is an absolute path",
    }
    for ref, why in cases.items():
        path = write_set(folder, [{**GOOD, "image": ref}], copy=False)
        assert why in refusal(path), (ref, refusal(path))
    shutil.copy(TOY / "eval" / "images" / "perception_0001.png", folder / "inside.png")
    (folder / "images" / "ok.png").symlink_to(folder / "inside.png")  # a link that stays inside is fine
    items = read_items(write_set(folder, [{**GOOD, "image": "images/ok.png", "id": 7}]))
    assert items[0]["pil"].size == (48, 48) and items[0]["id"] == "7"


def test_caps_on_items_size_and_emptiness(tmp_path, monkeypatch):
    path = write_set(tmp_path, [GOOD] * 4)
    monkeypatch.setattr(item_file, "MAX_ITEMS", 3)  # the reader lives in merging
    assert refusal(path) == f"{path} line 4: more than 3 items; split the file"
    monkeypatch.setattr(item_file, "MAX_FILE_BYTES", 100)
    assert refusal(path) == f"{path}: {path.stat().st_size} bytes; the limit is 100 bytes"
    monkeypatch.undo()
    empty = write_set(tmp_path, ["", "  "], "empty.jsonl")
    assert "no items" in refusal(empty)
    assert refusal(tmp_path / "missing.jsonl").endswith("no such file")
    long = write_set(tmp_path, [{"question": "x" * 3000, "answer": "1"}], "long.jsonl")
    assert refusal(long) == f"{long} line 1: \"question\" is 3,000 characters long; the limit is 2,000"
    (tmp_path / "latin.jsonl").write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "\xe9"}\n')
    assert refusal(tmp_path / "latin.jsonl") == f"{tmp_path / 'latin.jsonl'} line 2: not UTF-8 text"


def test_limit_opens_only_the_first_images_but_checks_every_line(tmp_path):
    rows = bundled("perception", 3) + ['{"question": "q"}']
    path = write_set(tmp_path, rows)
    assert "line 4" in refusal(path, limit=1)
    items = read_items(write_set(tmp_path, bundled("perception", 3)), limit=2)
    assert [it["id"] for it in items] == ["perception-0000", "perception-0001"] and "pil" in items[1]


def test_cli_refuses_a_bad_file_before_loading_the_model(tmp_path):
    path = write_set(tmp_path, [GOOD, '{"question": "q", "answer": "1", "image": "/etc/passwd"}'])
    r = cli("eval", tmp_path / "no-model", "--suite-file", path, module="analysis")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {path} line 2: \"image\" '/etc/passwd' is an absolute path; "
                                             "give it relative to the JSONL's folder"]


@pytest.fixture(scope="module")
def vlm():
    return load_model(TOY / "vlm")


def test_a_file_of_bundled_items_scores_as_the_bundled_suites(tmp_path, vlm):
    n = 8
    rows = bundled("perception", n) + bundled("text_math", n)
    got = evaluate(vlm, suites=[], extra={"custom": read_items(write_set(tmp_path, rows))}, return_items=True)
    want = evaluate(vlm, suites=["perception", "text_math"], limit=n, return_items=True)
    assert got["accuracy"]["custom"] == pytest.approx(
        (want["accuracy"]["perception"] + want["accuracy"]["text_math"]) / 2)
    assert got["items"]["custom"] == want["items"]["perception"] + want["items"]["text_math"]


def test_cli_scores_a_file_as_suite_custom(tmp_path, vlm):
    rows = bundled("visual_math", 6)
    path = write_set(tmp_path / "my set", rows)
    r = cli("eval", TOY / "vlm", "--suite-file", path, "--limit", "5", module="analysis")
    assert r.returncode == 0, r.stderr[-2000:]
    want = evaluate(vlm, suites=["visual_math"], limit=5, return_items=True)["items"]["visual_math"]
    k = sum(x["correct"] for x in want)
    got = json.loads(r.stdout)
    assert got["custom"] == round(k / 5, 4) and got["n"] == {"custom": 5}
    # the 95% Wilson interval, here from the score test's quadratic (n + z^2) p^2 - (2k + z^2) p + k^2/n = 0
    z = 1.959963984540054
    a, b, c = 5 + z * z, -(2 * k + z * z), k * k / 5
    roots = [(-b - (b * b - 4 * a * c) ** 0.5) / (2 * a), (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)]
    assert got["ci95"]["custom"] == pytest.approx(roots, abs=1e-4)
    assert f"custom: {k / 5:.2f} [" in r.stderr
