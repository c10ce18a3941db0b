"""`gateway.yaml`, validated at start (pydantic): a bad entry fails naming its path.

    gateway: {upstream_timeout_s: 60, scrape_interval_s: 1, saturation: {max_waiting: 8}}
    models:
      stories:
        routing: prefix            # prefix | least_loaded | round_robin
        versions:
          blue:  {backends: [http://10.0.0.1:8000, http://10.0.0.2:8000]}
          green: {backends: [http://10.0.0.3:8000], served_model: stories-v2}
        weights: {blue: 100, green: 0}   # blue-green: switch moves all traffic at once
        canary: {stable: blue, canary: green, steps: [5, 25, 50, 100], interval_s: 300}
        shadow: {version: green, sample_rate: 0.1}

Weights must sum to 100; every version named by weights, canary or shadow must exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Saturation(_Strict):
    """When a replica counts as saturated (the endpoint picker's queue and KV-cache thresholds)."""

    max_waiting: int = Field(8, ge=0, description="saturated past this vllm:num_requests_waiting")
    max_kv_cache_usage: float = Field(0.95, gt=0, le=1, description="saturated past this KV cache usage")


class GatewaySettings(_Strict):
    upstream_timeout_s: float = Field(60.0, gt=0)
    scrape_interval_s: float = Field(1.0, gt=0)
    health_timeout_s: float = Field(1.0, gt=0)
    health_path: str = "/ready"
    prefix_block_chars: int = Field(256, ge=1, description="the prompt's first block, hashed for routing")
    saturation: Saturation = Saturation()
    admin_token: str | None = None


class Version(_Strict):
    backends: list[str] = Field(min_length=1)
    served_model: str | None = None  # the name the backends know the model by (default: the model's)

    @field_validator("backends")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"backend {url!r} is not an http(s) URL")
        return [u.rstrip("/") for u in urls]


class Canary(_Strict):
    """A weighted rollout judged like Argo Rollouts' analysis / Kayenta: canary against stable."""

    stable: str
    canary: str
    steps: list[int] = Field(default=[5, 25, 50, 100], min_length=1)
    interval_s: float = Field(300.0, gt=0, description="healthy time at a step before the next")
    min_requests: int = Field(50, ge=1, description="canary requests before the gates judge")
    max_error_rate_increase: float = Field(0.05, ge=0, description="canary error rate - stable's")
    max_p95_latency_ratio: float = Field(1.5, gt=0, description="canary P95 / stable P95")

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError(f"steps {steps} must rise strictly within 1..100 and end at 100")
        return steps


class Shadow(_Strict):
    version: str
    sample_rate: float = Field(1.0, gt=0, le=1)
    max_in_flight: int = Field(16, ge=1, description="more shadows at once are skipped, never queued")


class ModelRoute(_Strict):
    routing: Literal["prefix", "least_loaded", "round_robin"] = "prefix"
    versions: dict[str, Version] = Field(min_length=1)
    weights: dict[str, int] | None = None
    canary: Canary | None = None
    shadow: Shadow | None = None

    @model_validator(mode="after")
    def _references(self) -> ModelRoute:
        named = [*(self.weights or {})]
        if self.canary:
            named += [self.canary.stable, self.canary.canary]
        if self.shadow:
            named.append(self.shadow.version)
        for name in named:
            if name not in self.versions:
                raise ValueError(f"unknown version {name!r} (versions: {sorted(self.versions)})")
        if self.weights is not None:
            if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) != 100:
                raise ValueError(f"weights {self.weights} must be non-negative and sum to 100")
        elif len(self.versions) > 1 and not self.canary:
            raise ValueError("several versions need weights (or a canary) to say which serves")
        return self

    def initial_weights(self) -> dict[str, int]:
        """The split at start: the canary's first step, else the configured weights, else the one version."""
        if self.canary:
            first = self.canary.steps[0]
            return {self.canary.stable: 100 - first, self.canary.canary: first}
        return dict(self.weights) if self.weights else {next(iter(self.versions)): 100}


class GatewayConfig(_Strict):
    gateway: GatewaySettings = GatewaySettings()
    models: dict[str, ModelRoute] = Field(min_length=1)


class ConfigError(ValueError):
    """A bad gateway.yaml; the message names the entry."""


def parse_config(data: object, source: str = "gateway.yaml") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: Path) -> GatewayConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return parse_config(data, str(path))
