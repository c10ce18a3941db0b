"""Authentication: who is calling, from `Authorization: Bearer <credential>` (RFC 6750).

A credential is one of: the server's single `--api-key`; a key from the key file (keys.py); a JWT
(jwt_auth.py). Every path needs one except the probes (`/health`, `/ready`, `/version`), the console's
static files (`/ui/...` but not `/ui/api/...`) and, unless `protect_metrics`, `/metrics`: deny by
default, so that `/tokenize`, `/docs` and any future route are covered without a list to keep up to date.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from shoal.policy.identity import Identity
from shoal.policy.jwt_auth import JWTPolicy, JWTVerifier, TokenRejected
from shoal.policy.keys import KEY_PREFIX, KeyStore

OPEN_PATHS = frozenset({"/health", "/ready", "/version"})
STATIC_KEY_ID = "api-key"  # the identity of the single --api-key


class AuthPolicy(BaseModel):
    """`auth` in the policy file."""

    model_config = ConfigDict(extra="forbid")
    keys_file: Path | None = None  # made by `shoal keys create`
    jwt: JWTPolicy | None = None
    protect_metrics: bool = False


@dataclass
class AuthFailure(Exception):
    """A refused credential: the reason (never the credential) and, when known, the key id it named."""

    reason: str
    key_id: str | None = None
    status: int = 401


def needs_auth(path: str, protect_metrics: bool) -> bool:
    if path == "/metrics":
        return protect_metrics
    if path == "/ui" or (path.startswith("/ui/") and not path.startswith("/ui/api/")):
        return False  # the console's static files: public, no data (its data is under /ui/api/)
    return path not in OPEN_PATHS


class Authenticator:
    """Maps an Authorization header to an Identity, or raises AuthFailure."""

    def __init__(self, policy: AuthPolicy | None, api_key: str | None, classes: set[str] | None = None):
        self.protect_metrics = bool(policy and policy.protect_metrics)
        self._classes = classes or None
        self._static = api_key.encode() if api_key else None
        self._keys = KeyStore(policy.keys_file) if policy and policy.keys_file else None
        self._jwt = JWTVerifier(policy.jwt, self._classes) if policy and policy.jwt else None

    @property
    def may_block(self) -> bool:
        """Whether authenticate() may fetch the JWKS over the network (call it off the event loop)."""
        return self._jwt is not None and self._jwt.source.stale

    def authenticate(self, authorization: bytes | None) -> Identity:
        scheme, _, credential = (authorization or b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthFailure("missing bearer credential: send 'Authorization: Bearer <key>'")
        credential = credential.strip()
        if self._static is not None and secrets.compare_digest(credential.encode(), self._static):
            return Identity(key_id=STATIC_KEY_ID, tenant=None)
        if self._keys is not None and credential.startswith(KEY_PREFIX):
            return self._key(credential)
        if self._jwt is not None and credential.count(".") == 2:
            try:
                return self._jwt.verify(credential)
            except TokenRejected as e:
                raise AuthFailure(str(e)) from None
        raise AuthFailure("unknown API key")

    def _key(self, credential: str) -> Identity:
        record = self._keys.lookup(credential)
        if record is None:
            raise AuthFailure("unknown API key")
        if record.revoked is not None:
            raise AuthFailure(f"API key {record.id} has been revoked", key_id=record.id)
        if self._classes and record.priority_class is not None and record.priority_class not in self._classes:
            raise AuthFailure(f"API key {record.id} names an unknown priority class", key_id=record.id)
        return record.identity()
