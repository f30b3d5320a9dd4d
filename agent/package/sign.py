"""Ed25519 keys and detached package signatures (via `cryptography`).

Keys: `keygen PREFIX` writes PREFIX.key (PKCS#8 PEM, mode 0600, never
overwritten) and PREFIX.pub (SubjectPublicKeyInfo PEM). A key's id is the
first 16 hex digits of the sha256 of its 32 raw public-key bytes.

Signature file: `<dir>/SIGNATURE` for a directory package, `<archive>.sig`
next to a tar. It is one JSON object:

    {"format": "skillguard-signature/1", "algorithm": "ed25519",
     "key_id": "...", "public_key": "<base64 raw>",
     "digest": "sha256:<hex>", "signature": "<base64>"}

The signed message is MESSAGE_PREFIX + the digest's hex digits, so a
signature over a package digest cannot be replayed as anything else. The
public key travels with the signature so that a changed package is told
apart ("tampered") from a signer the host does not know ("untrusted-key");
trust comes only from the host's own key files, never from this field.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass

from agent.package import PackageError
from agent.package.digest import SIGNATURE, digest_package, is_archive

FORMAT = "skillguard-signature/1"
MESSAGE_PREFIX = b"skillguard-package-signature/1\0"


def key_id_of(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def message_for(digest_hex: str) -> bytes:
    return MESSAGE_PREFIX + digest_hex.encode("ascii")


def signature_path(package: str) -> str:
    package = package.rstrip("/") or "/"
    return package + ".sig" if is_archive(package) else os.path.join(package, SIGNATURE)


@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private_path: str
    public_path: str


def generate_keypair(prefix: str) -> KeyPair:
    """Write PREFIX.key (0600) and PREFIX.pub; refuses to overwrite either."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = prefix + ".key", prefix + ".pub"
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise PackageError("bad-key", f"{path} already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        os.unlink(private_path)
        raise
    return KeyPair(key_id_of(raw_public(key.public_key())), private_path, public_path)


def _write_new(path: str, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise PackageError("bad-key", f"{path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away from `mode`
        os.write(fd, data)
    finally:
        os.close(fd)


def load_private_key(path: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PackageError("bad-key", f"{path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageError("bad-key", f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError("bad-key", f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: str):
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PackageError("bad-key", f"{path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PackageError("bad-key", f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError("bad-key", f"{path}: not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Signed:
    key_id: str
    digest: str
    signature_path: str


def sign_package(package: str, private_key_path: str) -> Signed:
    """Digest `package` and write its detached signature (replacing an older one)."""
    key = load_private_key(private_key_path)
    digest = digest_package(package).digest
    raw = raw_public(key.public_key())
    document = {
        "format": FORMAT,
        "algorithm": "ed25519",
        "key_id": key_id_of(raw),
        "public_key": base64.b64encode(raw).decode(),
        "digest": f"sha256:{digest}",
        "signature": base64.b64encode(key.sign(message_for(digest))).decode(),
    }
    path = signature_path(package)
    temporary = f"{path}.tmp.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.write(fd, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    return Signed(document["key_id"], digest, path)
