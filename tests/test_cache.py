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


@pytest.mark.parametrize("bad", [123, "not json {", '{"schema": 1, "data": [1, 2]}', '{"data": {}}'])
def test_wrong_type_or_garbled_entry_is_recomputed(cdir, bad):
    f = Counter({"ok": True})
    C.cached("a", ["k"], f, cdir)
    C.get_cache(cdir)._cache.set(C.make_key("a", ["k"]), bad)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert C.cached("a", ["k"], f, cdir) == {"ok": True}
    assert f.calls == 2
    assert any("corrupt cache entry" in str(x.message) for x in w)
    assert C.cached("a", ["k"], f, cdir) == {"ok": True} and f.calls == 2  # healed


def test_unpickling_error_is_recomputed(cdir):
    """Garble the stored bytes of a pickled entry directly in diskcache's sqlite database."""
    key = C.make_key("a", ["k"])
    c = C.get_cache(cdir)
    c._cache.set(key, {"pickled": "object"})  # stored as a pickle blob, not JSON text
    c.close()
    C._shared.clear()
    db = sqlite3.connect(cdir / "cache.db")
    n = db.execute("UPDATE Cache SET value = ? WHERE key = ?", (b"\x80\x05garbage", key)).rowcount
    db.commit()
    db.close()
    assert n == 1
    f = Counter({"fresh": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert C.cached("a", ["k"], f, cdir) == {"fresh": 1.0}
    assert f.calls == 1
    assert C.cached("a", ["k"], f, cdir) == {"fresh": 1.0} and f.calls == 1


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
