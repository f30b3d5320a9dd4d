"""agent/oslite.py behaves as the os/os.path functions it stands in for."""
import os
import stat

import pytest

from agent import oslite

PATHS = ["", ".", "..", "/", "//", "///", "a", "a/", "a//b", "/a/b/", "/a/./b/../c", "a/../..",
         "../a/b", "/..", "//a/../b", "///a//b/", "a/b/c/../../..", "./a/./", "/a/b/..", "~/x",
         "a/\udcff/b"]


@pytest.mark.parametrize("path", PATHS)
def test_normpath_dirname_abspath(path):
    assert oslite.normpath(path) == os.path.normpath(path)
    assert oslite.dirname(path) == os.path.dirname(path)
    assert oslite.abspath(path) == os.path.abspath(path)


@pytest.mark.parametrize("parts", [("a", "b"), ("/a", "/b"), ("a/", "b"), ("", "b"), ("a", ""),
                                   ("/", "a", "b/", "c"), ("a", "/b", "c")])
def test_join(parts):
    assert oslite.join(*parts) == os.path.join(*parts)


def test_environment_and_encoding(monkeypatch):
    monkeypatch.setenv("SG_OSLITE_TEST", "v\u00e9")
    assert oslite.getenv("SG_OSLITE_TEST") == os.environ["SG_OSLITE_TEST"]
    assert oslite.getenv("SG_OSLITE_ABSENT", "d") == "d"
    assert oslite.environ() == dict(os.environ)
    assert oslite.fsencode("a/\udcff") == os.fsencode("a/\udcff")


def test_stat_predicates_and_makedirs(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink("file", tmp_path / "link")
    for name in ("file", "link", "missing", ""):
        path = str(tmp_path / name)
        assert oslite.exists(path) == os.path.exists(path)
        assert oslite.isdir(path) == os.path.isdir(path)
        assert oslite.isfile(path) == os.path.isfile(path)
    assert not oslite.exists("bad\0path")
    leaf = str(tmp_path / "x" / "y" / "z")
    oslite.makedirs(leaf, 0o700)
    oslite.makedirs(leaf, 0o700)  # exists: no error
    assert stat.S_IMODE(os.stat(leaf).st_mode) == 0o700
    with pytest.raises(FileExistsError):
        oslite.makedirs(str(tmp_path / "file"))
