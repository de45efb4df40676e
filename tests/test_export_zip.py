"""An exported folder offered as one zip: every file, byte for byte, under the folder's name; none
over the size limit; the folder itself untouched."""

from __future__ import annotations

import zipfile

from webapp.export_zip import zip_for_download


def test_zip_holds_every_file_and_the_folder_is_untouched(tmp_path):
    folder = tmp_path / "linear-abc"
    (folder / "sub").mkdir(parents=True)
    files = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * 40, "sub/recipe.yaml": b"x: 1\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    archive, why = zip_for_download(folder)
    assert why == "" and archive.name == "linear-abc.zip" and not archive.is_relative_to(tmp_path)
    with zipfile.ZipFile(archive) as z:
        assert {n: z.read(n) for n in z.namelist()} == {f"linear-abc/{k}": v for k, v in files.items()}
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert not list(archive.parent.glob(".*.part"))


def test_over_the_limit_no_zip_and_a_reason(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 4096)
    archive, why = zip_for_download(tmp_path / "m", max_bytes=1024)
    assert archive is None and "over the" in why
