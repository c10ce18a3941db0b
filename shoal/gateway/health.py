"""Backend health and load: every `scrape_interval_s` each backend's `/ready` (taken out when it fails or
takes longer than `health_timeout_s`) and `/metrics` (`vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc`), the signals the Gateway API Inference Extension's endpoint picker and vLLM's
production-stack router score replicas by."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx

from shoal.gateway.config import GatewaySettings
from shoal.gateway.metrics import GatewayMetrics
from shoal.metric_names import KV_CACHE_USAGE, NUM_REQUESTS_WAITING

logger = logging.getLogger("shoal.gateway")
SCRAPED = (NUM_REQUESTS_WAITING, KV_CACHE_USAGE)  # what routing reads from a backend's /metrics


@dataclass
class Backend:
    url: str
    healthy: bool = False
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    in_flight: int = 0  # the gateway's own count: fresher than a scrape up to a second old
    last_error: str | None = None
    last_scrape: float = field(default=0.0)

    def saturated(self, limits) -> bool:
        return self.waiting > limits.max_waiting or self.kv_cache_usage > limits.max_kv_cache_usage

    def load(self) -> float:
        """Lower is better: queued requests first, then what the gateway has in flight there."""
        return self.waiting + self.in_flight / 1000 + self.kv_cache_usage / 1e6

    def describe(self, limits) -> dict:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "saturated": self.saturated(limits),
            "waiting": self.waiting,
            "kv_cache_usage": self.kv_cache_usage,
            "in_flight": self.in_flight,
            "last_error": self.last_error,
            "last_probe_age_s": round(time.monotonic() - self.last_scrape, 3) if self.last_scrape else None,
        }


def parse_gauges(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named metric's samples in Prometheus text (labels ignored: one engine per backend)."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                pass
    return out


class HealthChecker:
    """Probes all backends concurrently, once now (before the gateway serves) and then on a timer."""

    def __init__(self, backends: dict[str, Backend], settings: GatewaySettings, metrics: GatewayMetrics):
        self.backends, self.settings, self.metrics = backends, settings, metrics
        self._client = httpx.AsyncClient(timeout=settings.health_timeout_s)
        self._task: asyncio.Task | None = None

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(b) for b in self.backends.values()))

    async def _probe(self, backend: Backend) -> None:
        try:
            ready = await self._client.get(backend.url + self.settings.health_path)
            healthy = ready.status_code == 200
            backend.last_error = (
                None if healthy else f"{self.settings.health_path} answered {ready.status_code}"
            )
            if healthy:
                await self._scrape(backend)
        except httpx.HTTPError as e:
            healthy, backend.last_error = False, f"{type(e).__name__}: {e}"
        if healthy != backend.healthy:
            logger.warning("backend %s %s (%s)", backend.url, "in" if healthy else "out", backend.last_error)
        backend.healthy, backend.last_scrape = healthy, time.monotonic()
        self._export(backend)

    async def _scrape(self, backend: Backend) -> None:
        """Load metrics are optional: a server without them is routed by the gateway's in-flight count."""
        try:
            # name[]: only the two gauges read here (a backend that ignores the filter sends them all)
            resp = await self._client.get(backend.url + "/metrics", params={"name[]": SCRAPED})
        except httpx.HTTPError:
            return
        if resp.status_code != 200:
            return
        values = parse_gauges(resp.text, SCRAPED)
        backend.waiting, backend.kv_cache_usage = values[NUM_REQUESTS_WAITING], values[KV_CACHE_USAGE]

    def _export(self, b: Backend) -> None:
        m = self.metrics
        m.backend_up.labels(b.url).set(1 if b.healthy else 0)
        m.backend_waiting.labels(b.url).set(b.waiting)
        m.backend_kv.labels(b.url).set(b.kv_cache_usage)
        m.backend_saturated.labels(b.url).set(1 if b.saturated(self.settings.saturation) else 0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scrape_interval_s)
            await self.probe_all()

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._client.aclose()


async def unserved_models(pairs: list[tuple[str, str, str]], timeout_s: float) -> list[str]:
    """For (config entry, backend URL, model name) triples: the entries whose backend answers
    /v1/models without that model. Backends that are down or refuse the listing are not judged here
    (they may come up later; the health probes handle them)."""

    async def check(client: httpx.AsyncClient, entry: str, url: str, model: str) -> str | None:
        try:
            resp = await client.get(url + "/v1/models")
            served = {m.get("id") for m in resp.json().get("data", [])} if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if served is None or model in served:
            return None
        return f"{entry}: backend {url} serves {sorted(served)}, not {model!r} (set served_model)"

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        found = await asyncio.gather(*(check(client, *p) for p in pairs))
    return [f for f in found if f]
