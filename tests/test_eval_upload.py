"""An uploaded eval set gathered into one folder of the upload dir: files given one by one (images matched by
name), or one zip unpacked with its folders; nothing outside the upload dir read, no zip member written
outside the new folder, links and bombs refused."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from analysis.eval_file import check_items, read_items
from merging.errors import LabError
from tests.paths import TOY
from webapp.ui import eval_upload
from webapp.ui.eval_upload import stage


def rows(n: int = 3) -> list[dict]:
    return [json.loads(x) for x in (TOY / "eval" / "perception.jsonl").read_text().splitlines()[:n]]


@pytest.fixture
def uploads(tmp_path) -> Path:
    d = tmp_path / "uploads"
    d.mkdir()
    return d


def as_uploads(uploads: Path, files: dict[str, bytes]) -> list[str]:
    """Each file in its own random folder, as Gradio keeps uploads."""
    out, start = [], len(list(uploads.glob("u*")))
    for i, (name, data) in enumerate(files.items(), start):
        (uploads / f"u{i}").mkdir()
        (uploads / f"u{i}" / name).write_bytes(data)
        out.append(str(uploads / f"u{i}" / name))
    return out


def jsonl(items: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in items) + "\n").encode()


def test_files_one_by_one_are_matched_by_name(uploads):
    files = {"set.jsonl": jsonl(rows())}
    files.update({Path(r["image"]).name: (TOY / "eval" / r["image"]).read_bytes() for r in rows()})
    es = stage(as_uploads(uploads, files), [uploads], uploads)
    assert es.by_name and es.name == "set.jsonl" and es.jsonl.parent.parent == uploads
    items = read_items(es.jsonl, by_name=True, name=es.name)
    assert [it["id"] for it in items] == [r["id"] for r in rows()] and items[0]["pil"].size == (48, 48)
    # an image the JSONL names but that was not uploaded: its line is named
    paths = as_uploads(uploads / "u0", {"again.jsonl": jsonl(rows())})
    es = stage(paths, [uploads], uploads)
    with pytest.raises(LabError, match=r"^again.jsonl line 1: \"image\" 'images/perception_0000.png' is not there "
                                       r"\(upload it with the JSONL\)$"):
        check_items(es.jsonl, es.by_name, es.name)


def test_a_zip_keeps_its_folders(uploads, tmp_path):
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("my set/items.jsonl", jsonl(rows()))
        for r in rows():
            zf.write(TOY / "eval" / r["image"], f"my set/{r['image']}")
        zf.writestr("__MACOSX/._items.jsonl", b"junk")
    paths = as_uploads(uploads, {"set.zip": z.read_bytes()})
    es = stage(paths, [uploads], uploads)
    assert not es.by_name and es.name == "my set/items.jsonl"
    assert len(read_items(es.jsonl, name=es.name)) == 3


def zip_with(tmp_path, name: str, data: bytes = b"x", link: bool = False, encrypted: bool = False) -> bytes:
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("items.jsonl", jsonl(rows(1)))
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
    return flag_encrypted(z.read_bytes(), name) if encrypted else z.read_bytes()


def flag_encrypted(raw: bytes, name: str) -> bytes:
    """The archive with `name` flagged as password-protected, as an encrypting zip tool writes it (bit 0 of
    the flags in its central-directory entry and its local header; zipfile itself cannot write that)."""
    out, at = bytearray(raw), raw.find(b"PK\x01\x02")
    while at >= 0:
        n = int.from_bytes(raw[at + 28:at + 30], "little")
        if raw[at + 46:at + 46 + n] == name.encode():
            out[at + 8] |= 1
            out[int.from_bytes(raw[at + 42:at + 46], "little") + 6] |= 1
        at = raw.find(b"PK\x01\x02", at + 4)
    return bytes(out)


@pytest.mark.parametrize("member, link, why", [
    ("../escape.png", False, "zip refused: ../escape.png points outside the archive's folder"),
    ("/abs.png", False, "zip refused: /abs.png points outside the archive's folder"),
    ("images/link.png", True, "zip refused: images/link.png is a link"),
    ("second.jsonl", False, "set.zip: the zip holds 2 .jsonl files; put exactly one in it"),
])
def test_bad_zip_members_are_refused_and_nothing_is_left(uploads, tmp_path, member, link, why):
    paths = as_uploads(uploads, {"set.zip": zip_with(tmp_path, member, link=link)})
    with pytest.raises(LabError) as e:
        stage(paths, [uploads], uploads)
    assert str(e.value) == why
    assert not list(uploads.glob("eval-set-*")) and not (tmp_path / "escape.png").exists()


def test_an_encrypted_or_absurdly_deep_member_is_refused_in_one_line(uploads, tmp_path):
    """zipfile raises RuntimeError for a password-protected member, and a 2000-deep path fails in mkdir with a
    4000-character name: both become one short line, and nothing is left."""
    secret = as_uploads(uploads, {"set.zip": zip_with(tmp_path, "images/a.png", encrypted=True)})
    with pytest.raises(LabError, match=r"^zip refused: images/a.png is encrypted; zip the set without a password$"):
        stage(secret, [uploads], uploads)
    deep = "/".join(["d"] * 2000) + "/a.png"
    paths = as_uploads(uploads, {"deep.zip": zip_with(tmp_path, deep)})
    with pytest.raises(LabError) as e:
        stage(paths, [uploads], uploads)
    msg = str(e.value)
    assert msg.startswith("zip refused: d/d/") and msg.endswith("is 2000 folders deep; at most 16"), msg
    assert len(msg) < 200 and "\n" not in msg
    wide = "x" * 300 + ".png"
    paths = as_uploads(uploads, {"wide.zip": zip_with(tmp_path, wide)})
    with pytest.raises(LabError, match=r"is a path of 304 characters; at most 255$"):
        stage(paths, [uploads], uploads)
    assert not list(uploads.glob("eval-set-*"))


def test_caps_and_refusals(uploads, tmp_path, monkeypatch):
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(jsonl(rows(1)))
    with pytest.raises(LabError, match="was not uploaded to this app"):
        stage([str(outside)], [uploads], uploads)
    (uploads / "link.jsonl").symlink_to(outside)  # a link in the upload dir to a file outside it
    with pytest.raises(LabError, match="was not uploaded to this app"):
        stage([str(uploads / "link.jsonl")], [uploads], uploads)
    two = as_uploads(uploads, {"a.jsonl": b"{}", "b.jsonl": b"{}"})
    with pytest.raises(LabError, match=r"upload exactly one .jsonl file with its images \(2 given\)"):
        stage(two, [uploads], uploads)
    with pytest.raises(LabError, match="upload either one .zip or a .jsonl"):
        stage(as_uploads(uploads / "u0", {"x.zip": b"PK", "c.jsonl": b"{}"}), [uploads], uploads)
    with pytest.raises(LabError, match="x.zip is not a zip archive"):
        stage([str(uploads / "u0" / "u0" / "x.zip")], [uploads], uploads)
    monkeypatch.setattr(eval_upload, "MAX_UNPACKED", 10)
    with pytest.raises(LabError, match="zip refused: it unpacks to more than"):
        stage(as_uploads(uploads / "u1", {"big.zip": zip_with(tmp_path, "img.png", b"y" * 100)}), [uploads], uploads)
    with pytest.raises(LabError, match="upload a .jsonl file and its images"):
        stage([], [uploads], uploads)
    shutil.rmtree(uploads / "u0")


def test_a_staged_set_goes_when_unstaged_and_all_staged_sets_are_capped(uploads, monkeypatch):
    files = {"set.jsonl": jsonl(rows())}
    files.update({Path(r["image"]).name: (TOY / "eval" / r["image"]).read_bytes() for r in rows()})
    es = stage(as_uploads(uploads, files), [uploads], uploads)
    size = eval_upload.staged_bytes(uploads)
    assert size > 0 and es.jsonl.is_file()
    monkeypatch.setattr(eval_upload, "MAX_STAGED", size + 10)  # room for this one set, not two
    with pytest.raises(LabError, match=r"exceed their cap of 0 MB with this one"):
        stage(as_uploads(uploads / "u0", files), [uploads], uploads)
    assert eval_upload.staged_bytes(uploads) == size  # the refused one left nothing
    eval_upload.unstage(uploads, es.jsonl)
    assert eval_upload.staged_bytes(uploads) == 0 and not es.jsonl.exists()
    again = stage(as_uploads(uploads / "u1", files), [uploads], uploads)  # room again
    assert again.jsonl.is_file()
