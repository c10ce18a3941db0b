"""The metrics read when /metrics is scraped (gauges and the engine's own counters): nothing pushes them.

- EngineStatsCollector: the engine's EngineStats (queue gauges, KV cache, prefix cache, preemptions,
  the cache configuration, the last step's time, and the engine process's CUDA allocator counters).
- StateCollector: readiness and engine health, as /ready and /health see them.
- GpuCollector: NVML utilization and memory per device; no series at all without a GPU or driver.
- ProcessResourcesCollector: CPU seconds and resident memory of the server and engine core processes,
  and the host's network bytes (psutil).
Names, help and labels come from shoal/metric_names.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shoal import metric_names as mn
from shoal.engine.stats import EngineStats

logger = logging.getLogger("shoal.server")
_FAMILIES = {mn.COUNTER: CounterMetricFamily, mn.GAUGE: GaugeMetricFamily}


def family(name: str, rows: list[tuple[list[str], float]]) -> Metric:
    """A counter or gauge family of a declared metric, with one sample per (label values, value) row;
    the model_name label value comes first in each row."""
    spec = mn.BY_NAME[name]
    metric = _FAMILIES[spec.kind](spec.name, spec.help, labels=list(spec.labels))
    for labels, value in rows:
        metric.add_metric(labels, value)
    return metric


class DeclaredCollector:
    """A scrape-time collector whose families are declared up front (NAMES): prometheus_client's registry
    maps names to collectors through describe(), which is what its `name[]` filter (restricted_registry)
    and its duplicate-name check read; without it a collector's series are invisible to the filter."""

    NAMES: tuple[str, ...] = ()

    def describe(self) -> list[Metric]:
        return [family(name, []) for name in self.NAMES]


class EngineStatsCollector(DeclaredCollector):
    """The engine's stats as of the last refresh (the /metrics route refreshes them before rendering)."""

    NAMES = (
        mn.NUM_REQUESTS_RUNNING, mn.NUM_REQUESTS_WAITING, mn.KV_CACHE_USAGE, mn.GPU_CACHE_USAGE,
        mn.PREFIX_CACHE_QUERIES, mn.PREFIX_CACHE_HITS, mn.NUM_PREEMPTIONS, mn.STEPS_INTERRUPTED,
        mn.NUM_REQUESTS_SWAPPED,
        mn.CPU_CACHE_USAGE, mn.SWAPPED_OUT, mn.SWAPPED_IN, mn.CACHE_CONFIG_INFO, mn.ENGINE_LAST_STEP,
        mn.GPU_MEMORY_ALLOCATED, mn.GPU_MEMORY_RESERVED,
    )  # fmt: skip

    def __init__(self, engine: Any, model_name: str):
        self._engine = engine
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s: EngineStats = self._engine.stats
        one = [self._model]
        yield family(mn.NUM_REQUESTS_RUNNING, [(one, s.num_running)])
        yield family(mn.NUM_REQUESTS_WAITING, [(one, s.num_waiting)])
        yield family(mn.KV_CACHE_USAGE, [(one, s.kv_cache_usage)])
        yield family(mn.GPU_CACHE_USAGE, [(one, s.kv_cache_usage)])
        yield family(mn.PREFIX_CACHE_QUERIES, [(one, s.prefix_cache_queries)])
        yield family(mn.PREFIX_CACHE_HITS, [(one, s.prefix_cache_hits)])
        yield family(mn.NUM_PREEMPTIONS, [(one, s.num_preemptions)])
        yield family(mn.STEPS_INTERRUPTED, [(one, s.num_steps_interrupted)])
        yield family(mn.NUM_REQUESTS_SWAPPED, [(one, s.num_swapped)])
        yield family(mn.CPU_CACHE_USAGE, [(one, s.swap_usage)])
        yield family(mn.SWAPPED_OUT, [(one, s.num_swapped_out)])
        yield family(mn.SWAPPED_IN, [(one, s.num_swapped_in)])
        if s.num_kv_blocks:  # known once the model is loaded
            yield family(mn.CACHE_CONFIG_INFO, [([self._model, str(s.block_size), str(s.num_kv_blocks)], 1)])
        yield family(mn.ENGINE_LAST_STEP, [(one, s.last_step_unix)])
        if s.cuda_device is not None:  # absent, not zero, without CUDA
            device = [self._model, str(s.cuda_device)]
            yield family(mn.GPU_MEMORY_ALLOCATED, [(device, s.cuda_memory_allocated)])
            yield family(mn.GPU_MEMORY_RESERVED, [(device, s.cuda_memory_reserved)])


class StateCollector(DeclaredCollector):
    """shoal:ready and shoal:engine_healthy, read from the same properties as /ready and /health."""

    NAMES = (mn.READY, mn.ENGINE_HEALTHY)

    def __init__(self, ready: Callable[[], bool], healthy: Callable[[], bool], model_name: str):
        self._ready = ready
        self._healthy = healthy
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        yield family(mn.READY, [([self._model], float(self._ready()))])
        yield family(mn.ENGINE_HEALTHY, [([self._model], float(self._healthy()))])


class GpuCollector(DeclaredCollector):
    """NVML (nvidia-ml-py) utilization and used memory of every device the driver lists, labelled by
    NVML index. Without a GPU nvmlInit raises NVMLError_LibraryNotFound (or another NVMLError): then
    this collector yields nothing, so the series are absent rather than zero."""

    NAMES = (mn.GPU_UTILIZATION, mn.GPU_MEMORY_USED)

    def __init__(self, model_name: str):
        self._model = model_name
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # noqa: BLE001 - NVMLError, or no nvidia-ml-py: no GPU series
            logger.debug("no NVML, so no GPU metrics: %s", e)

    def collect(self) -> Iterator[Metric]:
        if not self._handles:
            return
        utilization, used = [], []
        for index, handle in enumerate(self._handles):
            labels = [self._model, str(index)]
            try:
                utilization.append((labels, self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                used.append((labels, self._nvml.nvmlDeviceGetMemoryInfo(handle).used))
            except self._nvml.NVMLError as e:  # a device fell off the bus: its series go absent
                logger.warning("NVML query of GPU %d failed: %s", index, e)
        yield family(mn.GPU_UTILIZATION, utilization)
        yield family(mn.GPU_MEMORY_USED, used)


class ProcessResourcesCollector(DeclaredCollector):
    """psutil: CPU seconds and resident memory per process ("server" is this one, "engine_core" the
    engine core process when the engine runs in one), and the host's (or container's) network bytes,
    since psutil has no per-process network counters on Linux."""

    NAMES = (mn.CPU_SECONDS, mn.RESIDENT_MEMORY, mn.NETWORK_RECEIVE, mn.NETWORK_TRANSMIT)

    def __init__(self, engine: Any, model_name: str):
        self._model = model_name
        self._processes = {"server": psutil.Process()}
        core_pid = getattr(engine, "core_pid", None)
        if core_pid is not None:
            try:
                self._processes["engine_core"] = psutil.Process(core_pid)
            except psutil.Error:
                pass

    def collect(self) -> Iterator[Metric]:
        cpu, rss = [], []
        for name, process in self._processes.items():
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu.append(([self._model, name], times.user + times.system))
                    rss.append(([self._model, name], process.memory_info().rss))
            except psutil.Error:  # the engine core died: liveness reports that, not this
                continue
        yield family(mn.CPU_SECONDS, cpu)
        yield family(mn.RESIDENT_MEMORY, rss)
        net = psutil.net_io_counters()
        if net is None:  # no network interface at all
            return
        yield family(mn.NETWORK_RECEIVE, [([self._model], net.bytes_recv)])
        yield family(mn.NETWORK_TRANSMIT, [([self._model], net.bytes_sent)])
