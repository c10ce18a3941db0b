"""The gateway's live state, built from a validated config: one Backend per URL (shared by every version
that lists it), and per model its versions' replicas, traffic split, replica picker, canary and shadow."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.gateway.canary import CanaryController
from shoal.gateway.config import GatewayConfig, ModelRoute
from shoal.gateway.health import Backend
from shoal.gateway.metrics import GatewayMetrics
from shoal.gateway.routing import ReplicaPicker, WeightedSplit
from shoal.gateway.shadow import ShadowRunner


@dataclass
class ModelState:
    name: str
    route: ModelRoute
    replicas: dict[str, list[Backend]]  # version -> backends
    split: WeightedSplit
    picker: ReplicaPicker
    canary: CanaryController | None
    shadow: ShadowRunner | None

    def served_model(self, version: str) -> str:
        return self.route.versions[version].served_model or self.name

    def switch(self, version: str) -> dict[str, int]:
        """Blue-green: all new requests to `version` at once; requests in flight finish where they are."""
        if version not in self.replicas:
            raise KeyError(version)
        if self.canary:
            self.canary.stop(f"manual switch to {version}")
        self.split.set({v: 100 if v == version else 0 for v in self.replicas})
        return self.split.weights

    def describe(self, limits) -> dict:
        return {
            "routing": self.route.routing,
            "weights": self.split.weights,
            "versions": {
                v: {"served_model": self.served_model(v), "backends": [b.describe(limits) for b in bs]}
                for v, bs in self.replicas.items()
            },
            "canary": self.canary.describe() if self.canary else None,
            "shadow": (
                {"version": self.route.shadow.version, "sample_rate": self.route.shadow.sample_rate}
                | self.shadow.stats.describe()
            )
            if self.shadow
            else None,  # fmt: skip
        }


class GatewayState:
    def __init__(self, config: GatewayConfig):
        self.config, self.settings = config, config.gateway
        self.metrics = GatewayMetrics()
        self.backends: dict[str, Backend] = {}
        self.models = {name: self._model(name, route) for name, route in config.models.items()}

    def _backend(self, url: str) -> Backend:
        return self.backends.setdefault(url, Backend(url))

    def _model(self, name: str, route: ModelRoute) -> ModelState:
        split = WeightedSplit(route.initial_weights())
        replicas = {v: [self._backend(u) for u in spec.backends] for v, spec in route.versions.items()}
        canary = CanaryController(name, route.canary, split, self.metrics) if route.canary else None
        shadow = (
            ShadowRunner(name, route.shadow, self.metrics, self.settings.upstream_timeout_s)
            if route.shadow
            else None
        )
        return ModelState(name, route, replicas, split, ReplicaPicker(route.routing, self.settings.saturation),
                          canary, shadow)  # fmt: skip

    def served_pairs(self) -> list[tuple[str, str, str]]:
        """(config entry, backend URL, model name the backend must serve), for the start-up check."""
        return [
            (f"models.{m.name}.versions.{v}", b.url, m.served_model(v))
            for m in self.models.values()
            for v, backends in m.replicas.items()
            for b in backends
        ]

    def export_weights(self) -> None:
        for model in self.models.values():
            for version, weight in model.split.weights.items():
                self.metrics.weight.labels(model.name, version).set(weight)
