"""OAuth2/OIDC bearer tokens: JWTs (RFC 7519) checked against a JWK Set (RFC 7517).

The policy fixes everything a token could otherwise choose for itself: the issuer, the audience and the
algorithm allow-list (`none` is never allowed, RFC 7518 section 3.6). A token's `alg` must also be the
algorithm of the key it names (`kid`), so that an RSA public key can never be used as an HMAC secret.
`exp` is required; `nbf`, when present, is checked (RFC 7519 sections 4.1.4-4.1.5).

The JWK Set comes from a file (read at start) or a URL (the IdP's `jwks_uri`), fetched on first use and
again when older than `jwks_cache_s`, or when a token names an unknown `kid` (a key rotation), at most
once per `jwks_refresh_min_s` so that made-up `kid`s cannot turn the server into a flood of fetches.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shoal.policy.identity import Identity

ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
HMAC = {"HS256", "HS384", "HS512"}
# pyjwt accepts short HMAC secrets with a mere warning; RFC 7518 section 3.2 asks for at least the
# hash's size, and 32 bytes is HS256's.
MIN_HMAC_KEY_BYTES = 32
FETCH_TIMEOUT_S = 5.0


class JWTPolicy(BaseModel):
    """`auth.jwt` in the policy file."""

    model_config = ConfigDict(extra="forbid")
    issuer: str
    audience: str | list[str]
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_cache_s: float = Field(300.0, gt=0)
    jwks_refresh_min_s: float = Field(30.0, ge=0)
    leeway_s: float = Field(0.0, ge=0, le=300, description="Clock skew allowed on exp and nbf.")
    subject_claim: str = "sub"
    tenant_claim: str = "tenant"
    class_claim: str | None = "priority_class"

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, algorithms: list[str]) -> list[str]:
        for alg in algorithms:
            if alg.lower() == "none":
                raise ValueError("'none' is never allowed: an unsigned token proves nothing")
            if alg not in ASYMMETRIC | HMAC:
                raise ValueError(f"unknown algorithm {alg!r}; allowed: {sorted(ASYMMETRIC | HMAC)}")
        return algorithms

    @model_validator(mode="after")
    def _one_jwks_source(self) -> JWTPolicy:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
        return self


class TokenRejected(Exception):
    """Why a token was refused; the message never contains the token."""


class JWKSource:
    """The signing keys by `kid`, from the policy's file or URL."""

    def __init__(self, policy: JWTPolicy):
        self.policy = policy
        self._lock = threading.Lock()
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        if policy.jwks_file is not None:
            self._keys = _parse_jwks(json.loads(policy.jwks_file.read_text()))
            self._fetched_at = float("inf")  # a file is read once, at start

    @property
    def stale(self) -> bool:
        """Whether the next lookup may fetch (a network call: run it off the event loop)."""
        return self._fetched_at is None or time.monotonic() - self._fetched_at > self.policy.jwks_cache_s

    def key(self, kid: str | None) -> jwt.PyJWK:
        if self.stale or (kid not in self._keys and self._may_refresh()):
            self._fetch()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid not in self._keys:
            raise TokenRejected(f"no key with kid {kid!r} in the JWKS")
        return self._keys[kid]

    def _may_refresh(self) -> bool:
        """A URL source, last fetched long enough ago (key() fetches first when never fetched)."""
        if self.policy.jwks_url is None or self._fetched_at is None:
            return False
        return time.monotonic() - self._fetched_at >= self.policy.jwks_refresh_min_s

    def _fetch(self) -> None:
        with self._lock:
            try:
                with urllib.request.urlopen(self.policy.jwks_url, timeout=FETCH_TIMEOUT_S) as response:
                    keys = _parse_jwks(json.loads(response.read()))
            except (OSError, ValueError, jwt.PyJWKSetError) as e:
                if not self._keys:
                    raise TokenRejected(f"the JWKS at {self.policy.jwks_url} is unavailable: {e}") from e
                keys = self._keys  # keep the last good set while the IdP is down
            self._keys = keys
            self._fetched_at = time.monotonic()


def _parse_jwks(data: Any) -> dict[str | None, jwt.PyJWK]:
    """RFC 7517 section 5: {"keys": [...]}; HMAC keys shorter than MIN_HMAC_KEY_BYTES are refused."""
    keys = {}
    for jwk in jwt.PyJWKSet.from_dict(data).keys:
        if jwk.algorithm_name in HMAC and len(jwk.key) < MIN_HMAC_KEY_BYTES:
            raise ValueError(f"JWK {jwk.key_id!r}: HMAC keys need at least {MIN_HMAC_KEY_BYTES} bytes")
        keys[jwk.key_id] = jwk
    return keys


class JWTVerifier:
    """Checks a bearer JWT and maps its claims to an Identity."""

    def __init__(self, policy: JWTPolicy, classes: set[str] | None = None):
        self.policy = policy
        self.source = JWKSource(policy)
        self.classes = classes

    def verify(self, token: str) -> Identity:
        """The caller's Identity; TokenRejected naming the failed check otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise TokenRejected(f"malformed token: {e}") from None
        alg = header.get("alg")
        if alg not in self.policy.algorithms:
            raise TokenRejected(f"algorithm {alg!r} is not allowed (allowed: {self.policy.algorithms})")
        jwk = self.source.key(header.get("kid"))
        if jwk.algorithm_name != alg:
            raise TokenRejected(f"the token's algorithm {alg} is not its key's ({jwk.algorithm_name})")
        try:
            claims = jwt.decode(
                token,
                jwk.key,
                algorithms=[alg],
                audience=self.policy.audience,
                issuer=self.policy.issuer,
                leeway=self.policy.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as e:
            raise TokenRejected(f"invalid token: {e}") from None
        return self._identity(claims)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        p = self.policy
        priority_class = _claim(claims, p.class_claim) if p.class_claim else None
        if priority_class is not None and self.classes is not None and priority_class not in self.classes:
            raise TokenRejected(f"claim {p.class_claim!r} names no priority class of this server")
        return Identity(
            key_id=_claim(claims, p.subject_claim),
            tenant=_claim(claims, p.tenant_claim),
            priority_class=priority_class,
        )


def _claim(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise TokenRejected(f"claim {name!r} must be a string")
    return value
