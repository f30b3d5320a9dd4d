"""Check a package's detached signature: who signed it, and is it still what was signed.

`verify_package(path, trusted)` digests the package afresh, reads its
signature file, and raises PackageError with the first reason that applies:

    invalid-package       the package itself is refused (see digest.py)
    unsigned              no signature file
    malformed-signature   the signature file is not one this version writes
    tampered              the package's digest is not the signed one, or the
                          signature does not verify with the key it names
    untrusted-key         a valid signature, by a key not in `trusted`

`trusted=None` checks integrity only (for `info`): the result then says
who signed, and trust is the caller's business.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from agent.package import PackageError
from agent.package.digest import PackageDigest, digest_package
from agent.package.sign import FORMAT, key_id_of, message_for, signature_path

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_SIGNATURE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SignatureDoc:
    path: str
    key_id: str
    public_key: bytes  # 32 raw bytes
    digest: str  # hex
    signature: bytes


@dataclass(frozen=True)
class Verified:
    package: str
    digest: str
    key_id: Optional[str]  # None: unsigned (only when the caller allowed that)
    trusted: bool  # signed by a key in the trusted set
    contents: PackageDigest  # manifest_text is the manifest exactly as digested


def read_signature(package: str, contents: PackageDigest) -> SignatureDoc:
    path = signature_path(package)
    data: Optional[bytes]
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        data = contents.embedded_signature  # a signed directory that was then archived
        if data is None:
            raise PackageError("unsigned", f"{package}: no signature ({path} does not exist)") from None
        path = f"{package}:SIGNATURE"
    except OSError as exc:
        raise PackageError("malformed-signature", f"{path}: {exc.strerror}") from None
    return parse_signature(data, path)


def parse_signature(data: bytes, path: str) -> SignatureDoc:
    def bad(why: str) -> PackageError:
        return PackageError("malformed-signature", f"{path}: {why}")

    if len(data) > MAX_SIGNATURE_BYTES:
        raise bad("larger than 64 KiB")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    if document.get("format") != FORMAT or document.get("algorithm") != "ed25519":
        raise bad(f"format must be {FORMAT!r} with algorithm 'ed25519'")
    fields = {}
    for key in ("key_id", "public_key", "digest", "signature"):
        if not isinstance(document.get(key), str):
            raise bad(f"{key}: missing or not a string")
        fields[key] = document[key]
    try:
        public_key = base64.b64decode(fields["public_key"], validate=True)
        signature = base64.b64decode(fields["signature"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(f"invalid base64 ({exc})") from None
    if len(public_key) != 32 or len(signature) != 64:
        raise bad("an Ed25519 public key is 32 bytes and a signature 64")
    if key_id_of(public_key) != fields["key_id"]:
        raise bad(f"key_id {fields['key_id']!r} is not the id of the public key it carries")
    algorithm, _, digest = fields["digest"].partition(":")
    if algorithm != "sha256" or not _HEX64.match(digest):
        raise bad("digest must be 'sha256:' and 64 lower-case hex digits")
    return SignatureDoc(path, fields["key_id"], public_key, digest, signature)


def verify_package(package: str, trusted: Optional[Mapping[str, object]] = None) -> Verified:
    """See the module doc. `trusted` maps key id -> Ed25519PublicKey."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    contents = digest_package(package)
    doc = read_signature(package, contents)
    if doc.digest != contents.digest:
        raise PackageError("tampered", f"{package}: the contents changed after signing "
                                       f"(signed sha256:{doc.digest}, now sha256:{contents.digest})")
    try:
        Ed25519PublicKey.from_public_bytes(doc.public_key).verify(doc.signature,
                                                                   message_for(contents.digest))
    except InvalidSignature:
        raise PackageError("tampered", f"{doc.path}: the signature does not verify with key "
                                       f"{doc.key_id} (the signature file was altered)") from None
    is_trusted = False
    if trusted is not None:
        if doc.key_id not in trusted:
            known = ", ".join(sorted(trusted)) or "none"
            raise PackageError("untrusted-key", f"{package}: signed by key {doc.key_id}, "
                                                f"which is not trusted (trusted: {known})")
        from agent.package.sign import raw_public

        # The id is a prefix of a hash: compare the keys themselves.
        if raw_public(trusted[doc.key_id]) != doc.public_key:
            raise PackageError("untrusted-key", f"{package}: key {doc.key_id} is not the trusted "
                                                "key with that id")
        is_trusted = True
    return Verified(os.path.abspath(package), contents.digest, doc.key_id, is_trusted, contents)
