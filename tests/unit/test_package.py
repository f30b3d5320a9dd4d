"""Signed skill packages: canonical digest, Ed25519 signatures, the host's trust rule."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from agent.config import HostConfig
from agent.package import PackageError
from agent.package.digest import digest_package
from agent.package.sign import generate_keypair, sign_package, signature_path
from agent.package.trust import admit_manifest, admit_package
from agent.package.verify import verify_package

MANIFEST = b"name: pkg-skill\nversion: \"1\"\nentrypoint: /usr/bin/true\n"


def make_package(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "bin").mkdir(parents=True)
    (pkg / "manifest.yaml").write_bytes(MANIFEST)
    (pkg / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (pkg / "bin" / "tool").chmod(0o755)
    (pkg / "README").write_text("hello\n")
    (pkg / "tool-link").symlink_to("bin/tool")
    return pkg


@pytest.fixture
def keys(tmp_path):
    return generate_keypair(str(tmp_path / "signer")), generate_keypair(str(tmp_path / "stranger"))


@pytest.fixture
def signed(tmp_path, keys):
    pkg = make_package(tmp_path)
    sign_package(str(pkg), keys[0].private_path)
    return pkg


def strict(*key_paths: str) -> HostConfig:
    return HostConfig(require_signed=True, trusted_keys=tuple(key_paths), source="test.yaml")


def refusal(pkg: Path, config: HostConfig) -> PackageError:
    with pytest.raises(PackageError) as info:
        admit_package(str(pkg), config)
    return info.value


# ------------------------------------------------------------------ keys


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path):
    pair = generate_keypair(str(tmp_path / "k"))
    assert stat.S_IMODE(os.stat(pair.private_path).st_mode) == 0o600
    assert Path(pair.public_path).read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(pair.key_id) == 16 and int(pair.key_id, 16) >= 0
    with pytest.raises(PackageError) as info:
        generate_keypair(str(tmp_path / "k"))
    assert info.value.reason == "bad-key" and "already exists" in str(info.value)


def test_a_public_key_file_that_is_not_ed25519_is_a_clear_error(tmp_path, signed):
    bogus = tmp_path / "bogus.pub"
    bogus.write_text("not a key\n")
    error = refusal(signed, strict(str(bogus)))
    assert error.reason == "bad-key" and str(bogus) in str(error)


# ------------------------------------------------------------------ digest


def test_digest_is_deterministic_and_covers_paths_modes_and_contents(tmp_path):
    pkg = make_package(tmp_path)
    first = digest_package(str(pkg))
    assert digest_package(str(pkg)).digest == first.digest
    listing = first.canonical().decode().splitlines()
    assert listing[0] == "skillguard-package/1"
    assert '["bin/tool","file","0755",' in "\n".join(listing)
    assert '["tool-link","symlink","0000","bin/tool"]' in listing
    assert first.manifest_text == MANIFEST


def _tar_of(pkg: Path, out: Path, arcname: str = ".") -> Path:
    with tarfile.open(out, "w:gz") as archive:
        archive.add(pkg, arcname=arcname)
    return out


@pytest.mark.parametrize("arcname", [".", "pkg"])
def test_same_package_as_directory_or_tar_has_the_same_digest(tmp_path, arcname):
    pkg = make_package(tmp_path)
    archive = _tar_of(pkg, tmp_path / "pkg.skill", arcname)
    assert digest_package(str(archive)).digest == digest_package(str(pkg)).digest


def test_signature_file_is_not_part_of_the_digest(signed):
    before = digest_package(str(signed)).digest
    assert (signed / "SIGNATURE").exists()
    (signed / "SIGNATURE").unlink()
    assert digest_package(str(signed)).digest == before


def test_a_signed_directory_archived_with_its_signature_verifies(tmp_path, keys, signed):
    archive = _tar_of(signed, tmp_path / "pkg.skill")
    assert not os.path.exists(signature_path(str(archive)))
    admitted = admit_package(str(archive), strict(keys[0].public_path))
    assert admitted.key_id == keys[0].key_id and admitted.trusted


def test_tar_package_signed_next_to_it(tmp_path, keys):
    archive = _tar_of(make_package(tmp_path), tmp_path / "pkg.skill")
    signed = sign_package(str(archive), keys[0].private_path)
    assert signed.signature_path == f"{archive}.sig"
    assert admit_package(str(archive), strict(keys[0].public_path)).digest == signed.digest


# ------------------------------------------------------------------ the matrix


def test_signed_package_is_admitted_under_require_signed(signed, keys):
    admitted = admit_package(str(signed), strict(keys[0].public_path))
    assert admitted.key_id == keys[0].key_id
    assert admitted.trusted and admitted.notes == ()
    assert admitted.manifest_text == MANIFEST


def _flip_byte(pkg: Path) -> None:
    data = bytearray((pkg / "bin" / "tool").read_bytes())
    data[3] ^= 0x01
    (pkg / "bin" / "tool").write_bytes(bytes(data))


def _add_file(pkg: Path) -> None:
    (pkg / "bin" / "extra").write_text("new\n")


def _rename_file(pkg: Path) -> None:
    (pkg / "README").rename(pkg / "README.txt")


def _change_mode(pkg: Path) -> None:
    (pkg / "README").chmod(0o755)


def _remove_file(pkg: Path) -> None:
    (pkg / "README").unlink()


def _change_manifest(pkg: Path) -> None:
    (pkg / "manifest.yaml").write_bytes(MANIFEST + b"permissions:\n  fs:\n    dirs: [\"/:rw\"]\n")


@pytest.mark.parametrize("change", [_flip_byte, _add_file, _rename_file, _change_mode,
                                    _remove_file, _change_manifest])
def test_any_change_after_signing_is_refused_as_tampered(signed, keys, change):
    change(signed)
    error = refusal(signed, strict(keys[0].public_path))
    assert error.reason == "tampered", error
    assert "changed after signing" in str(error)


def test_untrusted_key_is_refused(tmp_path, keys):
    pkg = make_package(tmp_path)
    sign_package(str(pkg), keys[1].private_path)
    error = refusal(pkg, strict(keys[0].public_path))
    assert error.reason == "untrusted-key"
    assert keys[1].key_id in str(error) and keys[0].key_id in str(error)


def test_unsigned_package_is_refused(tmp_path, keys):
    error = refusal(make_package(tmp_path), strict(keys[0].public_path))
    assert error.reason == "unsigned"


def test_require_signed_with_no_trusted_keys_refuses_everything(signed):
    assert refusal(signed, strict()).reason == "untrusted-key"


def test_altered_signature_is_tampered(signed, keys):
    sig = signed / "SIGNATURE"
    document = json.loads(sig.read_text())
    raw = bytearray(__import__("base64").b64decode(document["signature"]))
    raw[0] ^= 0x80
    document["signature"] = __import__("base64").b64encode(bytes(raw)).decode()
    sig.write_text(json.dumps(document))
    error = refusal(signed, strict(keys[0].public_path))
    assert error.reason == "tampered" and "does not verify" in str(error)


def test_digest_rewritten_to_match_changed_contents_is_still_tampered(signed, keys):
    _flip_byte(signed)
    sig = signed / "SIGNATURE"
    document = json.loads(sig.read_text())
    document["digest"] = "sha256:" + digest_package(str(signed)).digest
    sig.write_text(json.dumps(document))
    assert refusal(signed, strict(keys[0].public_path)).reason == "tampered"


def test_a_public_key_swapped_into_the_signature_is_refused(signed, keys):
    # Re-sign with the stranger's key but claim nothing else: still untrusted.
    sign_package(str(signed), keys[1].private_path)
    assert refusal(signed, strict(keys[0].public_path)).reason == "untrusted-key"


@pytest.mark.parametrize("text", ["", "{", "[]", '{"format": "other"}',
                                  '{"format": "skillguard-signature/1", "algorithm": "ed25519"}'])
def test_malformed_signature_file(signed, keys, text):
    (signed / "SIGNATURE").write_text(text)
    assert refusal(signed, strict(keys[0].public_path)).reason == "malformed-signature"


def test_mismatched_key_id_is_malformed(signed, keys):
    sig = signed / "SIGNATURE"
    document = json.loads(sig.read_text())
    document["key_id"] = "0" * 16
    sig.write_text(json.dumps(document))
    assert refusal(signed, strict(keys[0].public_path)).reason == "malformed-signature"


# ------------------------------------------------------------------ require_signed off


def test_without_require_signed_unsigned_and_untrusted_are_admitted_with_a_note(tmp_path, keys):
    relaxed = HostConfig(trusted_keys=(keys[0].public_path,), source="test.yaml")
    pkg = make_package(tmp_path)
    admitted = admit_package(str(pkg), relaxed)
    assert admitted.key_id is None and "unsigned" in admitted.notes[0]
    sign_package(str(pkg), keys[1].private_path)
    admitted = admit_package(str(pkg), relaxed)
    assert admitted.key_id == keys[1].key_id and not admitted.trusted
    assert "untrusted key" in admitted.notes[0]


def test_without_require_signed_a_broken_signature_is_still_refused(signed, keys):
    _add_file(signed)
    assert refusal(signed, HostConfig()).reason == "tampered"


def test_bare_manifest_is_refused_under_require_signed():
    admit_manifest(HostConfig())
    with pytest.raises(PackageError) as info:
        admit_manifest(strict())
    assert info.value.reason == "unsigned" and "test.yaml" in str(info.value)


def test_verify_without_a_trust_set_reports_the_signer(signed, keys):
    verified = verify_package(str(signed))
    assert verified.key_id == keys[0].key_id and not verified.trusted


# ------------------------------------------------------------------ refused packages


def _invalid(path) -> str:
    with pytest.raises(PackageError) as info:
        digest_package(str(path))
    assert info.value.reason == "invalid-package"
    return str(info.value)


def test_package_without_manifest_is_invalid(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "manifest.yaml" in _invalid(tmp_path / "empty")


def test_fifo_is_refused(tmp_path):
    pkg = make_package(tmp_path)
    os.mkfifo(pkg / "pipe")
    assert "FIFO" in _invalid(pkg)


def test_hard_link_is_refused(tmp_path):
    pkg = make_package(tmp_path)
    os.link(pkg / "README", tmp_path / "outside")
    assert "hard link" in _invalid(pkg)


@pytest.mark.parametrize("target", ["/etc/shadow", "../../outside", "bin/../../x", "bin/../README"])
def test_symlink_leaving_the_package_is_refused(tmp_path, target):
    pkg = make_package(tmp_path)
    (pkg / "bin" / "escape").symlink_to(target)
    assert "escape" in _invalid(pkg)


def _tar(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    out = tmp_path / "crafted.skill"
    with tarfile.open(out, "w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def _member(name: str, kind=tarfile.REGTYPE, mode: int = 0o644, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    return info


MANIFEST_MEMBER = (_member("manifest.yaml"), MANIFEST)


@pytest.mark.parametrize("members,words", [
    ([MANIFEST_MEMBER, (_member("../evil"), b"x")], "'..'"),
    ([MANIFEST_MEMBER, (_member("/etc/evil"), b"x")], "absolute"),
    ([MANIFEST_MEMBER, (_member("dev", tarfile.CHRTYPE), None)], "device"),
    ([MANIFEST_MEMBER, (_member("link", tarfile.LNKTYPE, linkname="manifest.yaml"), None)], "hard link"),
    ([MANIFEST_MEMBER, (_member("manifest.yaml"), b"again")], "twice"),
    ([MANIFEST_MEMBER, (_member("sub/file"), b"x")], "no entry of its own"),
    ([MANIFEST_MEMBER, (_member("d", tarfile.SYMTYPE, linkname="/tmp"), None)], "absolute path"),
    ([MANIFEST_MEMBER, (_member("d", tarfile.SYMTYPE, linkname="."), None),
      (_member("d/x"), b"x")], "is a symlink"),
])
def test_crafted_tar_members_are_refused(tmp_path, members, words):
    assert words in _invalid(_tar(tmp_path, members))


def test_not_a_tar_is_invalid(tmp_path):
    junk = tmp_path / "junk.skill"
    junk.write_bytes(b"\x00" * 10)
    assert "tar" in _invalid(junk)


def test_missing_package_is_invalid(tmp_path):
    assert "no such file" in _invalid(tmp_path / "nope")


def test_copy_of_a_signed_package_elsewhere_still_verifies(tmp_path, signed, keys):
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy, symlinks=True)
    assert admit_package(str(copy), strict(keys[0].public_path)).key_id == keys[0].key_id


def test_symlinks_inside_the_package_are_kept(tmp_path):
    pkg = make_package(tmp_path)
    (pkg / "bin" / "readme").symlink_to("../README")
    (pkg / "bin" / "self").symlink_to("./tool")
    assert digest_package(str(pkg)).digest


# ------------------------------------------------------------------ the CLI


def _cli(*argv: str) -> int:
    from agent.cli import main

    return main(list(argv))


def _config(tmp_path: Path, *keys: str, required: bool = True) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"require_signed: {'true' if required else 'false'}\n"
                    f"trusted_keys: {json.dumps(list(keys))}\n")
    return path


def test_cli_keygen_sign_verify_info(tmp_path, capsys):
    pkg = make_package(tmp_path)
    assert _cli("keygen", "--out", str(tmp_path / "cli")) == 0
    assert _cli("sign", str(pkg), "--key", str(tmp_path / "cli.key")) == 0
    assert _cli("verify", str(pkg), "--pubkey", str(tmp_path / "cli.pub")) == 0
    assert "ok: signed by trusted key" in capsys.readouterr().out
    assert _cli("verify", str(pkg), "--config", str(_config(tmp_path))) == 1
    assert "untrusted-key" in capsys.readouterr().err
    assert _cli("info", str(pkg)) == 0
    out = capsys.readouterr().out
    digest = digest_package(str(pkg)).digest
    assert f"digest    sha256:{digest}" in out and "signature valid" in out
    assert "skill pkg-skill 1 (enforce)" in out and "seccomp:" in out and "landlock (ABI" in out
    _flip_byte(pkg)
    assert _cli("verify", str(pkg), "--pubkey", str(tmp_path / "cli.pub")) == 1
    assert "refused: tampered" in capsys.readouterr().err
    assert _cli("info", str(pkg)) == 0
    assert "INVALID: tampered" in capsys.readouterr().out


@pytest.mark.parametrize("setup,reason", [
    ("unsigned", "unsigned"), ("tampered", "tampered"), ("untrusted", "untrusted-key"),
    ("bare", "unsigned"),
])
def test_cli_run_refuses_before_launching_under_require_signed(tmp_path, keys, capsys, setup, reason):
    pkg = make_package(tmp_path)
    if setup != "unsigned":
        sign_package(str(pkg), keys[1 if setup == "untrusted" else 0].private_path)
    if setup == "tampered":
        _rename_file(pkg)
    config = _config(tmp_path, keys[0].public_path)
    source = ["--manifest", str(pkg / "manifest.yaml")] if setup == "bare" else ["--package", str(pkg)]
    code = _cli("run", *source, "--config", str(config), "--state-root", str(tmp_path / "state"))
    err = capsys.readouterr().err
    assert code == 125
    assert f"error: package: {reason}:" in err and "the skill was not started" in err
    assert not (tmp_path / "state").exists()  # refused before anything was set up


def test_cli_run_reports_a_broken_host_config(tmp_path, signed, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("require_signed: maybe\n")
    assert _cli("run", "--package", str(signed), "--config", str(bad)) == 125
    assert "config:" in capsys.readouterr().err


# ------------------------------------------------------------------ the pin field


def test_entrypoint_pin_is_parsed_lower_case_and_checked_by_the_schema():
    import jsonschema
    import yaml

    from agent.manifest import load_text

    root = Path(__file__).resolve().parents[2]
    schema = json.loads((root / "agent/manifest/manifest.schema.json").read_text())
    text = "name: p\nversion: '1'\nentrypoint: /usr/bin/true\nentrypoint_sha256: " + "AB" * 32 + "\n"
    result = load_text(text)
    assert result.ok and result.policy.entrypoint_sha256 == "ab" * 32
    jsonschema.validate(yaml.safe_load(text), schema)
    for bad in ("bad-entrypoint-pin.yaml",):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load((root / "tests/data/bad" / bad).read_text()), schema)
