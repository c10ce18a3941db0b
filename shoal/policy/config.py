"""The policy file (`shoal serve --policy policy.yaml`): one YAML document, validated at start.

Every section is optional and off when absent (input limits have defaults of their own). An invalid
file fails at start with the path of the bad field, e.g. `classes.premium.priority: Input should be a
valid integer`. The complete schema, with an example, is in docs/security.md.

Top level:
- `classes`: priority classes, name -> {priority}; a lower priority value is served earlier (vLLM's
  `priority` field). A request's class sets its default priority and a floor it cannot go above.
- `default_class`: the class of requests whose identity names none.
- `response_cache`: answers to repeated deterministic requests (response_cache.py).
- `content_filter`: keyword/regex rules and plug-ins on prompts and outputs (content_filter.py).
- `auth`: API keys (a key file) and JWT bearer tokens (auth.py, keys.py, jwt_auth.py).
- `audit`: the HMAC-chained audit log (audit.py).
- `tenants`: prefix-cache isolation between tenants (tenancy.py); on by default.
- `rate_limits`: requests and tokens per window, per key, per tenant and global (ratelimit.py).
- `limits`: input validation and cost caps, on by default (caps.py).
- `shedding`: load shedding and degraded mode (shedding.py).
- `breaker`: the circuit breaker in front of the engine (breaker.py).
"""

from __future__ import annotations

from pathlib import Path

import jwt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shoal.policy.audit import AuditPolicy, LineCipher, hmac_key_from_env
from shoal.policy.auth import Authenticator, AuthPolicy
from shoal.policy.breaker import BreakerPolicy
from shoal.policy.caps import InputLimits
from shoal.policy.content_filter import ContentFilterPolicy
from shoal.policy.ratelimit import RateLimitPolicy
from shoal.policy.response_cache import ResponseCachePolicy
from shoal.policy.shedding import SheddingPolicy
from shoal.policy.tenancy import TenantsPolicy


class PolicyError(ValueError):
    """An invalid policy file; the message names the file and the path of each bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PriorityClass(_Section):
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="Lower is served earlier.")


class PolicyConfig(_Section):
    classes: dict[str, PriorityClass] = Field(default_factory=dict)
    default_class: str | None = None
    response_cache: ResponseCachePolicy | None = None
    content_filter: ContentFilterPolicy | None = None
    auth: AuthPolicy | None = None
    audit: AuditPolicy | None = None
    tenants: TenantsPolicy = Field(default_factory=TenantsPolicy)
    rate_limits: RateLimitPolicy | None = None
    limits: InputLimits = Field(default_factory=InputLimits)
    shedding: SheddingPolicy | None = None
    breaker: BreakerPolicy | None = None

    @model_validator(mode="after")
    def _default_class_exists(self) -> PolicyConfig:
        if self.default_class is not None and self.default_class not in self.classes:
            raise ValueError(
                f"default_class {self.default_class!r} is not one of classes: {sorted(self.classes)}"
            )
        return self

    def priority_of(self, class_name: str | None) -> int:
        """The priority value of a class (the default class, or 0, when the name is None)."""
        name = class_name or self.default_class
        if name is None:
            return 0
        if name not in self.classes:
            raise KeyError(f"unknown priority class {name!r}")
        return self.classes[name].priority

    def job_priority(self, class_name: str | None, requested: int | None) -> int:
        """A request's priority: its class's value by default; a client may ask for a larger (less
        urgent) value, never a smaller one (the class is a floor)."""
        if not self.classes:
            return requested or 0
        floor = self.priority_of(class_name)
        return floor if requested is None else max(requested, floor)


def check_runtime(policy: PolicyConfig) -> None:
    """What the file cannot show by itself, checked before the engine starts: the audit keys are in the
    environment, and the key file and JWKS file (when configured) are readable and valid."""
    try:
        if policy.audit is not None:
            hmac_key_from_env(policy.audit.key_env)
            if policy.audit.encrypt:
                LineCipher.from_env(policy.audit.encryption_key_env)
        if policy.auth is not None:
            Authenticator(policy.auth, None, set(policy.classes))
    except (OSError, ValueError, jwt.PyJWTError) as e:
        raise PolicyError(f"policy: {e}") from None


def load_policy(path: str | Path) -> PolicyConfig:
    """Read and validate a policy file. Raises PolicyError naming the file and each bad field's path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy file: {e}") from e
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: the policy must be a mapping at the top level")
    try:
        return PolicyConfig.model_validate(raw)
    except ValidationError as e:
        raise PolicyError(f"{path}: {validation_problems(e)}") from None


def validation_problems(e: ValidationError) -> str:
    """Each bad field's dotted path and pydantic's message, for errors that name what to fix."""
    return "; ".join(f"{_dotted(err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors())


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)
