"""agent/cache.py: memoized results are reused only when safe and current."""
import os

import pytest

from agent import cache


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    tmp_path.chmod(0o711)
    return str(tmp_path)


def counter():
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}
    return calls, compute


def test_second_call_is_a_hit(root):
    calls, compute = counter()
    assert cache.memo("k", b"key", compute, root=root) == {"value": 1}
    assert cache.memo("k", b"key", compute, root=root) == {"value": 1}
    assert len(calls) == 1
    assert oct(os.stat(os.path.join(root, "cache")).st_mode & 0o777) == "0o700"


def test_other_key_or_kind_is_a_miss(root):
    calls, compute = counter()
    cache.memo("k", b"a", compute, root=root)
    cache.memo("k", b"b", compute, root=root)
    cache.memo("other", b"a", compute, root=root)
    assert len(calls) == 3


def test_code_change_is_a_miss(root, monkeypatch):
    calls, compute = counter()
    cache.memo("k", b"key", compute, root=root)
    monkeypatch.setattr(cache, "_fingerprint", [b"another version of the code"])
    cache.memo("k", b"key", compute, root=root)
    assert len(calls) == 2


def test_damaged_entry_is_recomputed(root):
    calls, compute = counter()
    cache.memo("k", b"key", compute, root=root)
    (entry,) = os.listdir(os.path.join(root, "cache"))
    with open(os.path.join(root, "cache", entry), "wb") as fh:
        fh.write(b"\x80\x05garbage")
    assert cache.memo("k", b"key", compute, root=root) == {"value": 2}


def test_entry_others_could_write_is_not_trusted(root):
    calls, compute = counter()
    cache.memo("k", b"key", compute, root=root)
    (entry,) = os.listdir(os.path.join(root, "cache"))
    os.chmod(os.path.join(root, "cache", entry), 0o666)
    cache.memo("k", b"key", compute, root=root)
    assert len(calls) == 2


def test_loose_root_disables_the_cache(root):
    os.chmod(root, 0o777)
    calls, compute = counter()
    cache.memo("k", b"key", compute, root=root)
    cache.memo("k", b"key", compute, root=root)
    assert len(calls) == 2
    assert not os.path.exists(os.path.join(root, "cache"))


def test_env_switch_disables_the_cache(root, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, "1")
    calls, compute = counter()
    cache.memo("k", b"key", compute, root=root)
    cache.memo("k", b"key", compute, root=root)
    assert len(calls) == 2


def test_key_of_is_stable_for_equal_values_built_apart():
    from agent.manifest.model import Resources

    assert cache.key_of(Resources(pids=3), "x") == cache.key_of(Resources(pids=int("3")), "x")
    assert cache.key_of(Resources(pids=3)) != cache.key_of(Resources(pids=4))
