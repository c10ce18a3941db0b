"""API keys: a key file of hashed secrets, managed by `shoal keys create|list|revoke`.

A key is `shoal-<id>.<secret>`: the id names the record, the secret is 256 random bits. The file stores
only the SHA-256 of the whole key (FIPS 180-4): a key this random needs no slow hash, since nobody can
guess it, and a leaked file gives no key back. The key itself is printed once, at creation.

The file is JSON, `{"keys": [{id, sha256, tenant, priority_class, limits, created, revoked}, ...]}`,
written atomically with mode 0600; a running server rereads it when it changes, so a revoked key stops
working at its next request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shoal.policy.identity import Identity, Limits

logger = logging.getLogger("shoal.policy")

KEY_PREFIX = "shoal-"
_ID_BYTES = 6
_SECRET_BYTES = 32


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class KeyRecord(BaseModel):
    """One key as stored: never its secret, only the SHA-256 of the key."""

    model_config = ConfigDict(extra="forbid")
    id: str
    sha256: str
    tenant: str | None = None
    priority_class: str | None = None
    limits: KeyLimits = Field(default_factory=KeyLimits)
    created: float = Field(default_factory=time.time)
    revoked: float | None = None  # Unix time of revocation

    def identity(self) -> Identity:
        limits = Limits(self.limits.requests_per_minute, self.limits.tokens_per_minute)
        return Identity(key_id=self.id, tenant=self.tenant, priority_class=self.priority_class, limits=limits)


class KeyFileData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyRecord] = Field(default_factory=list)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: Path) -> list[KeyRecord]:
    """The records of a key file (none when the file does not exist yet)."""
    if not path.exists():
        return []
    return KeyFileData.model_validate_json(path.read_text()).keys


def write_keys(path: Path, keys: list[KeyRecord]) -> None:
    """Atomic (write a temporary file, then rename): a server reading the file never sees half of it."""
    text = KeyFileData(keys=keys).model_dump_json(indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)  # hashes only, but still nobody else's business
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_key(
    path: Path,
    tenant: str | None = None,
    priority_class: str | None = None,
    limits: KeyLimits | None = None,
) -> tuple[KeyRecord, str]:
    """Add a new key to the file; returns its record and the key, which is not stored anywhere."""
    keys = read_keys(path)
    taken = {k.id for k in keys}
    key_id = secrets.token_hex(_ID_BYTES)
    while key_id in taken:
        key_id = secrets.token_hex(_ID_BYTES)
    key = f"{KEY_PREFIX}{key_id}.{secrets.token_urlsafe(_SECRET_BYTES)}"
    record = KeyRecord(
        id=key_id,
        sha256=hash_key(key),
        tenant=tenant,
        priority_class=priority_class,
        limits=limits or KeyLimits(),
    )
    write_keys(path, [*keys, record])
    return record, key


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    """Mark a key revoked (kept in the file, so that its id stays meaningful in the audit log)."""
    keys = read_keys(path)
    for i, record in enumerate(keys):
        if record.id == key_id:
            if record.revoked is None:
                keys[i] = record.model_copy(update={"revoked": time.time()})
                write_keys(path, keys)
            return keys[i]
    raise KeyError(f"no key with id {key_id!r} in {path}")


class KeyStore:
    """The server's view of a key file: looks a presented key up by its hash, rereading the file when its
    modification time or size changes (one stat per request)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, KeyRecord] = {}
        self._reload()

    def lookup(self, key: str) -> KeyRecord | None:
        """The record of this key, revoked or not; None when the file has no such key."""
        self._reload()
        return self._by_hash.get(hash_key(key))

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self._stamp is not None:
            return
        with self._lock:
            try:
                records = read_keys(self.path)
            except (OSError, ValueError):
                if self._stamp is None:
                    raise  # at start: a broken key file stops the server
                # While serving: keep the keys last read rather than lock everyone out mid-edit.
                logger.exception("key file %s unreadable; keeping the keys read before", self.path)
                return
            self._by_hash = {r.sha256: r for r in records}
            self._stamp = stamp or (0, 0)
