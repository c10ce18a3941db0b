"""AES-256-GCM at rest (NIST SP 800-38D) for what shoal stores that holds prompts and outputs: audit
lines and response-cache entries in Redis. Each message gets a fresh random 96-bit nonce, stored in
front of the ciphertext; the GCM tag makes any change to the stored bytes fail to open.

The key is 32 random bytes, base64-encoded in an environment variable (never in the policy file):
`python -c "import os, base64; print(base64.b64encode(os.urandom(32)).decode())"`.
"""

from __future__ import annotations

import base64
import binascii
import os

NONCE_BYTES = 12
KEY_BYTES = 32


class EncryptionKeyError(ValueError):
    """The key's environment variable is missing or does not hold 32 bytes of base64."""


class Cipher:
    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only when encryption is on

        if len(key) != KEY_BYTES:
            raise EncryptionKeyError(f"an AES-256 key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    @staticmethod
    def key_from_env(name: str, what: str) -> bytes:
        """The key in environment variable `name` (EncryptionKeyError naming `what` if it is unusable)."""
        try:
            key = base64.b64decode(os.environ.get(name, ""), validate=True)
        except binascii.Error:
            key = b""
        if len(key) != KEY_BYTES:
            raise EncryptionKeyError(f"{what}: set {name} to {KEY_BYTES} random bytes in base64")
        return key

    def seal(self, data: bytes) -> bytes:
        """nonce || ciphertext || tag."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, None)

    def open(self, sealed: bytes) -> bytes:
        """The plaintext; cryptography.exceptions.InvalidTag if the bytes were changed."""
        return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], None)
