"""Who is calling: set on the request's context (`RequestContext.identity`) once authenticated.

Authentication (API keys, JWT) produces it; rate limits, priority classes, cache salts and the audit log
read it. Without authentication every request is `ANONYMOUS`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """A key's own limits (None: only the tenant's and the global ones apply)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class Identity:
    key_id: str | None  # the API key's id (never its secret), or the JWT subject
    tenant: str | None  # rate limits, cache salts and response-cache entries are per tenant
    priority_class: str | None = None  # a name from the policy's `classes`; None: the default class
    limits: Limits = Limits()


ANONYMOUS = Identity(key_id=None, tenant=None)
