"""The host's rule for packages: `require_signed` and `trusted_keys` from HostConfig.

`admit_package(path, config)` is the one check `run --package`, and the
daemon's `launch` and `register`, make before they use a package:

- require_signed: true  -> the package must carry a valid signature by a
  trusted key; unsigned, tampered, malformed and untrusted-key packages are
  refused (PackageError, whose reason says which).
- require_signed: false -> a tampered or malformed signature is still
  refused (a signature that is there must hold); an unsigned package or one
  signed by a key the host does not list is admitted with a note.

`admit_manifest(config)` is the matching rule for a bare manifest file: it
carries no signature, so require_signed refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from agent.package import PackageError


@dataclass(frozen=True)
class Admission:
    package: str
    digest: str
    key_id: str | None  # None: unsigned
    trusted: bool
    manifest_text: bytes  # exactly the bytes that were digested
    notes: tuple[str, ...]


def load_trusted_keys(paths: Iterable[str]) -> dict:
    """key id -> Ed25519PublicKey for each public key file; a bad file is an error."""
    from agent.package.sign import key_id_of, load_public_key, raw_public

    keys = {}
    for path in paths:
        key = load_public_key(path)
        keys[key_id_of(raw_public(key))] = key
    return keys


def admit_package(path: str, config, extra_keys: Iterable[str] = ()) -> Admission:
    """Verify `path` under `config` (a HostConfig); raise PackageError when refused."""
    from agent.package.verify import verify_package

    trusted = load_trusted_keys(tuple(config.trusted_keys) + tuple(extra_keys))
    if config.require_signed:
        verified = verify_package(path, trusted)
        return Admission(verified.package, verified.digest, verified.key_id, True,
                         verified.contents.manifest_text, ())
    try:
        verified = verify_package(path, trusted)
    except PackageError as exc:
        if exc.reason == "unsigned":
            from agent.package.digest import digest_package

            contents = digest_package(path)
            return Admission(path, contents.digest, None, False, contents.manifest_text,
                             (f"package: unsigned (admitted: require_signed is off in "
                              f"{config.source})",))
        if exc.reason != "untrusted-key":
            raise
        verified = verify_package(path, None)
        return Admission(verified.package, verified.digest, verified.key_id, False,
                         verified.contents.manifest_text,
                         (f"package: signed by untrusted key {verified.key_id} (admitted: "
                          f"require_signed is off in {config.source})",))
    return Admission(verified.package, verified.digest, verified.key_id, True,
                     verified.contents.manifest_text, ())


def admit_manifest(config) -> None:
    """A bare manifest has no signature: refused when the host requires one."""
    if config.require_signed:
        raise PackageError("unsigned", f"a bare manifest carries no signature and "
                                       f"require_signed is true in {config.source}; "
                                       "run a signed package (--package)")
