"""The policy directory: validated at start and on reload; a bad edit keeps the previous version."""
from agent.daemon.policies import PolicyStore

GOOD = 'name: {name}\nversion: "{version}"\npermissions:\n  fs:\n    dirs:\n      - /srv/{name}:ro\n'


def test_load_reload_keep_previous_and_remove(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.format(name="alpha", version="1"))
    (tmp_path / "b.yml").write_text(GOOD.format(name="beta", version="1"))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "broken.yaml").write_text("name: [\n")
    store = PolicyStore(str(tmp_path))
    report = store.reload()
    assert sorted(store.by_name) == ["alpha", "beta"]
    assert sorted(report.loaded) == ["alpha", "beta"]
    assert list(report.rejected) == [str(tmp_path / "broken.yaml")]
    assert "invalid YAML" in report.rejected[str(tmp_path / "broken.yaml")][0]

    # An invalid edit of a good file: rejected with its error, the previous version stays.
    (tmp_path / "a.yaml").write_text("name: alpha\nversion: 2\npermissions:\n  fs:\n    dirs:\n      - relative:rw\n")
    report = store.reload()
    assert report.kept_previous == ["alpha"]
    assert store.get("alpha").policy.version == "1"
    assert any("relative" in line for line in report.rejected[str(tmp_path / "a.yaml")])
    assert report.unchanged == ["beta"]

    # A valid edit replaces it; removing a file removes its policy.
    (tmp_path / "a.yaml").write_text(GOOD.format(name="alpha", version="3"))
    (tmp_path / "b.yml").unlink()
    report = store.reload()
    assert store.get("alpha").policy.version == "3"
    assert report.removed == ["beta"] and store.get("beta") is None


def test_duplicate_names_first_wins(tmp_path):
    (tmp_path / "1.yaml").write_text(GOOD.format(name="same", version="1"))
    (tmp_path / "2.yaml").write_text(GOOD.format(name="same", version="2"))
    store = PolicyStore(str(tmp_path))
    report = store.reload()
    assert store.get("same").policy.version == "1"
    assert "already defined" in report.rejected[str(tmp_path / "2.yaml")][0]


def test_missing_directory_is_empty(tmp_path):
    store = PolicyStore(str(tmp_path / "nope"))
    assert store.reload().rejected == {} and store.by_name == {}
