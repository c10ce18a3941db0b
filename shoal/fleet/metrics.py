"""One /metrics for the whole server: the fleet's own series (load time, loaded models, unloads,
fallbacks, the budget) and every loaded model's series, merged into one exposition. Each model's app
labels its series with its own `model_name`, so merging is a union of samples per family."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from shoal import metric_names as mn
from shoal.server.metrics import LATENCY_BUCKETS


class FleetMetrics:
    def __init__(self, refs: list[str], budget: Any, loaded_apps: Callable[[], list[Any]]):
        self.registry = r = CollectorRegistry()
        spec = mn.BY_NAME
        self.loaded = Gauge(mn.MODEL_LOADED, spec[mn.MODEL_LOADED].help, [mn.MODEL_NAME], registry=r)
        self.load_time = Histogram(
            mn.MODEL_LOAD_TIME, spec[mn.MODEL_LOAD_TIME].help, [mn.MODEL_NAME], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        unloads, fallbacks = spec[mn.MODEL_UNLOADS], spec[mn.MODEL_FALLBACKS]
        self.unloads = Counter(unloads.name, unloads.help, list(unloads.labels), registry=r)
        self.fallbacks = Counter(fallbacks.name, fallbacks.help, list(fallbacks.labels), registry=r)
        Gauge(mn.MEMORY_BUDGET, spec[mn.MEMORY_BUDGET].help, registry=r).set(budget.total)
        Gauge(mn.MEMORY_RESERVED, spec[mn.MEMORY_RESERVED].help, registry=r).set_function(lambda: budget.used)
        for ref in refs:
            self.loaded.labels(ref).set(0)
        self._loaded_apps = loaded_apps

    def on_load(self, ref: str, seconds: float) -> None:
        self.loaded.labels(ref).set(1)
        self.load_time.labels(ref).observe(seconds)

    def on_unload(self, ref: str, reason: str) -> None:
        self.loaded.labels(ref).set(0)
        self.unloads.labels(ref, reason).inc()

    def on_fallback(self, requested: str, answered: str) -> None:
        self.fallbacks.labels(requested, answered).inc()

    async def render(self) -> bytes:
        """The fleet's series and each loaded model's, after each model's engine stats are refreshed."""
        registries = [self.registry]
        for app in self._loaded_apps():
            server_metrics = app.state.shoal.metrics
            await server_metrics.refresh()
            registries.append(server_metrics.registry)
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged(registries))
        return generate_latest(merged)


class _Merged(Collector):
    """The families of several registries, one family per name; a sample already seen (the HTTP
    process's own series, which every model's registry exports alike) is kept once."""

    def __init__(self, registries: Iterable[CollectorRegistry]):
        self._registries = list(registries)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        seen: set[tuple] = set()
        for registry in self._registries:
            for family in registry.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in seen:
                        seen.add(key)
                        merged.samples.append(sample)
        return list(families.values())
