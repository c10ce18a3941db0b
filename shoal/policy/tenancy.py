"""Tenant isolation of the prefix cache: the server sets each request's `cache_salt` from its tenant.

The engine mixes `cache_salt` into the hash of a request's first KV block (SHA-256, chained), so two
requests share cached blocks only when their salts are equal. With a policy, the salt is derived from
the caller's tenant (and the client's own salt, if it sent one), so no client can choose another
tenant's salt: tenants never share blocks unless `share_groups` puts them in one group.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field


class TenantsPolicy(BaseModel):
    """`tenants` in the policy file."""

    model_config = ConfigDict(extra="forbid")
    isolate_prefix_cache: bool = True
    # tenant -> group: tenants of one group share prefix-cache blocks with each other.
    share_groups: dict[str, str] = Field(default_factory=dict)

    def cache_salt(self, tenant: str | None, client_salt: str | None) -> str | None:
        """The salt the engine gets: a SHA-256 of (group, client salt), so that no client-chosen salt can
        equal one derived for another group. Requests without a tenant form a group of their own."""
        if not self.isolate_prefix_cache:
            return client_salt
        group = self.share_groups.get(tenant, tenant) if tenant is not None else None
        encoded = json.dumps(["shoal-tenant", group, client_salt]).encode()
        return hashlib.sha256(encoded).hexdigest()
