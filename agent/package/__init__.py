"""Skill packages: a directory (or a `.skill` tar of one) holding `manifest.yaml`
and the skill's files, signed with a detached Ed25519 signature.

    digest.py   canonical digest of a package (pure: reads, never writes)
    sign.py     key generation, key ids, writing the detached signature
    verify.py   checking a signature against the package and a set of keys
    trust.py    the host's rule (require_signed, trusted_keys): admit or refuse

Every refusal is a `PackageError` whose `reason` is one word a caller can
branch on (see REASONS) and whose message says what was found.
"""
from __future__ import annotations

# unsigned: no signature file; tampered: the contents (or the signature file)
# changed after signing; untrusted-key: a valid signature by a key the host
# does not trust; malformed-signature: the signature file cannot be read;
# invalid-package: the package itself is refused (device file, `..`, ...);
# bad-key: a key file cannot be used.
REASONS = ("unsigned", "tampered", "untrusted-key", "malformed-signature",
           "invalid-package", "bad-key")


class PackageError(Exception):
    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"PackageError: unknown reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
