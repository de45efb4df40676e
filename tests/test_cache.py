"""The analysis cache: hits, persistence across restarts, and corrupt entries that heal."""

import sqlite3
import warnings

import pytest

from analysis import cache as C


@pytest.fixture
def cdir(tmp_path):
    C._shared.clear()  # each test starts with no open caches, as after a restart
    yield tmp_path / "cache"
    for c in C._shared.values():
        c.close()
    C._shared.clear()


class Counter:
    def __init__(self, value):
        self.calls, self.value = 0, value

    def __call__(self):
        self.calls += 1
        return self.value


def test_second_identical_request_hits_the_cache(cdir):
    f = Counter({"x": [1.0, 2.5], "n": 3})
    a = C.cached("spectra", {"fp": "abc", "k": 8}, f, cdir)
    b = C.cached("spectra", {"k": 8, "fp": "abc"}, f, cdir)  # same parts, other order
    assert a == b == {"x": [1.0, 2.5], "n": 3}
    assert f.calls == 1
    C.cached("spectra", {"fp": "abc", "k": 16}, f, cdir)  # another parameter -> computed
    C.cached("similarity", {"fp": "abc", "k": 8}, f, cdir)  # another analysis -> computed
    assert f.calls == 3


def test_survives_a_restart(cdir):
    f = Counter({"v": 1.0})
    C.cached("a", ["fp1"], f, cdir)
    C.get_cache(cdir).close()
    C._shared.clear()
    assert C.cached("a", ["fp1"], f, cdir) == {"v": 1.0}
    assert f.calls == 1


def test_env_variable_sets_the_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path / "envcache"))
    assert C.default_dir() == tmp_path / "envcache"
    monkeypatch.delenv("MERGE_LAB_CACHE")
    assert C.default_dir().name == "merge-lab"


def _plain(cdir):
    """diskcache with its default Disk, as an attacker (or an older version of the lab) writes rows."""
    import diskcache

    return diskcache.Cache(str(cdir))


class SideEffect:
    """Unpickling this opens (creates) `marker`: code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _recomputed(cdir, key_parts, warned=True):
    f = Counter({"fresh": 1.0})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert C.cached("a", key_parts, f, cdir) == {"fresh": 1.0}
    assert f.calls == 1
    assert not warned or any("corrupt cache entry" in str(x.message) for x in w)
    assert C.cached("a", key_parts, f, cdir) == {"fresh": 1.0} and f.calls == 1  # healed
    return f


@pytest.mark.parametrize("bad", [123, 1.5, b"{}", "not json {", '{"schema": 2, "data": [1, 2]}', '{"data": {}}'])
def test_wrong_type_or_garbled_entry_is_recomputed(cdir, bad):
    f = Counter({"ok": True})
    C.cached("a", ["k"], f, cdir)
    C.get_cache(cdir).close()
    C._shared.clear()
    with _plain(cdir) as plain:
        plain.set(C.make_key("a", ["k"]), bad)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert C.cached("a", ["k"], f, cdir) == {"ok": True}
    assert f.calls == 2
    assert any("corrupt cache entry" in str(x.message) for x in w)
    assert C.cached("a", ["k"], f, cdir) == {"ok": True} and f.calls == 2  # healed


def test_a_pickle_row_is_never_unpickled(cdir, tmp_path):
    """A real diskcache row in pickle mode whose unpickling would create a file."""
    import shutil

    key = C.make_key("a", ["k"])
    marker = tmp_path / "code-ran"
    with _plain(cdir) as plain:
        plain.set(key, SideEffect(marker))
    shutil.copytree(cdir, tmp_path / "copy")
    with _plain(tmp_path / "copy") as plain:  # the row is live: plain diskcache runs it
        plain.get(key)
    assert marker.exists()
    marker.unlink()
    _recomputed(cdir, ["k"])
    assert not marker.exists()


def test_garbled_pickle_bytes_are_recomputed(cdir):
    """A pickle-mode row whose bytes are garbage (as a torn write leaves it)."""
    key = C.make_key("a", ["k"])
    with _plain(cdir) as plain:
        plain.set(key, {"pickled": "object"})
    db = sqlite3.connect(cdir / "cache.db")
    n = db.execute("UPDATE Cache SET value = ? WHERE key = ?", (b"\x80\x05garbage", key)).rowcount
    db.commit()
    db.close()
    assert n == 1
    _recomputed(cdir, ["k"])


@pytest.mark.parametrize("mode", [2, 3, 4])  # diskcache's binary, text and pickle file modes
def test_a_row_naming_a_file_outside_is_neither_read_nor_deleted(cdir, tmp_path, mode):
    key = C.make_key("a", ["k"])
    outside = tmp_path / "outside.json"
    outside.write_text('{"schema": 2, "data": {"stolen": 1}}')
    with _plain(cdir) as plain:
        plain.set(key, "x")
    db = sqlite3.connect(cdir / "cache.db")
    n = db.execute("UPDATE Cache SET mode = ?, filename = ?, value = NULL WHERE key = ?",
                   (mode, "../outside.json", key)).rowcount
    db.commit()
    db.close()
    assert n == 1
    _recomputed(cdir, ["k"])  # not {"stolen": 1}
    assert outside.read_text() == '{"schema": 2, "data": {"stolen": 1}}'


def test_only_text_is_ever_stored(cdir):
    c = C.get_cache(cdir)
    C.cached("a", ["k"], lambda: {"v": 1.0}, cdir)
    c.close()
    db = sqlite3.connect(cdir / "cache.db")
    rows = db.execute("SELECT mode, filename, typeof(value) FROM Cache").fetchall()
    db.close()
    assert rows == [(1, None, "text")]  # MODE_RAW, no value file, JSON text
    assert not [p for p in cdir.rglob("*") if p.suffix == ".val"]


def test_entries_of_the_previous_schema_are_not_used(cdir, monkeypatch):
    """Schema-1 entries (written before results were keyed on the live weights) are recomputed."""
    monkeypatch.setattr(C, "SCHEMA", 1)
    C.cached("webapp-attention", {"fp": "vlm"}, lambda: {"beta": 0.5}, cdir)
    monkeypatch.undo()
    f = Counter({"beta": 0.1})
    assert C.cached("webapp-attention", {"fp": "vlm"}, f, cdir) == {"beta": 0.1} and f.calls == 1


def test_unusable_folder_only_costs_speed(tmp_path):
    C._shared.clear()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    f = Counter({"v": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert C.cached("a", ["k"], f, blocker / "sub") == {"v": 2.0}
        assert C.cached("a", ["k"], f, blocker / "sub") == {"v": 2.0}
    assert f.calls == 2
    C._shared.clear()


def test_results_must_be_plain_data_of_the_expected_type(cdir):
    with pytest.raises(TypeError):
        C.cached("a", ["k"], lambda: [1, 2], cdir)
    tup = C.cached("b", ["k"], lambda: {"t": (1, 2)}, cdir)
    assert tup == {"t": [1, 2]}  # a first call returns what a cached call would
