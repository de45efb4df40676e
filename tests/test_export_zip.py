"""An exported folder offered as one zip: every file, byte for byte, under the folder's name; none
over the size limit; the folder itself untouched."""

from __future__ import annotations

import zipfile
from pathlib import Path

from webapp.ui.export_zip import zip_for_download


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


def test_exports_do_not_pile_up(tmp_path):
    from webapp.ui.export_zip import exports_folder

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first, _ = zip_for_download(folder)
    assert first.name == "m.zip" and first.parent.parent == exports_folder()
    second, _ = zip_for_download(folder)  # the first is younger than KEEP_S: kept
    assert first.is_file() and second.is_file() and second != first
    third, _ = zip_for_download(folder, keep_s=0)  # both earlier ones are old enough now
    assert not first.exists() and not second.exists() and third.is_file()
    assert [p.name for p in exports_folder().iterdir()] == [third.parent.name]


def test_the_exports_folder_goes_with_the_process(tmp_path):
    import subprocess
    import sys

    from tests.paths import ENV, ROOT

    code = ("from pathlib import Path; from webapp.ui.export_zip import zip_for_download\n"
            f"f = Path({str(tmp_path)!r}) / 'm'; f.mkdir(); (f / 'config.json').write_text('{{}}')\n"
            "print(zip_for_download(f)[0])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    made = Path(r.stdout.strip())
    assert made.name == "m.zip" and not made.parent.parent.exists()
