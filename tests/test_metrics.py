"""GET /metrics of a live `shoal serve` (stories260K): counters equal what a known workload sent, histogram
counts equal its choices, every series is declared in shoal/metric_names.py with the documented labels.

The server is shared with other test files, so every check is on the increase across this file's own
workload (scrapes before and after), never on absolute values.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal import metric_names as mn
from shoal.gateway.health import parse_gauges
from shoal.live_stats import Scrape

try:
    from server_fixture import SERVED_NAME, TINY_MODEL, live_server  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import SERVED_NAME, TINY_MODEL, live_server  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.timeout(60)
ABORTED_MAX_TOKENS = 500  # far more than are generated before the server notices the hang-up
HISTOGRAMS_PER_CHOICE = (
    mn.TIME_TO_FIRST_TOKEN,
    mn.TIME_PER_OUTPUT_TOKEN,
    mn.E2E_LATENCY,
    mn.QUEUE_TIME,
    mn.PREFILL_TIME,
    mn.DECODE_TIME,
)


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client() as client:
        yield client


def scrape(http: httpx.Client) -> Scrape:
    r = http.get("/metrics")
    assert r.status_code == 200
    return Scrape.parse(r.text)


class Workload:
    """What was sent and what came back, choice by choice."""

    def __init__(self) -> None:
        self.prompt_tokens = 0  # per choice
        self.completion_tokens = 0  # returned, finished choices
        self.finished_choices = 0
        self.hidden_choices = 0  # echo with max_tokens 0: one hidden token each
        self.engine_requests = 0
        self.reasons: dict[str, int] = {}
        self.aborted_choices = 0

    def answer(self, body: dict, usage: dict, reasons: list[str], prompts: int = 1) -> None:
        n = body.get("n", 1)
        self.prompt_tokens += usage["prompt_tokens"] * n
        self.completion_tokens += usage["completion_tokens"]
        self.engine_requests += prompts
        self.finished_choices += len(reasons)
        if body.get("max_tokens") == 0:
            self.hidden_choices += len(reasons)
        for reason in reasons:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    @property
    def choices(self) -> int:
        return self.finished_choices + self.aborted_choices


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json={"model": SERVED_NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _stream(http: httpx.Client, path: str, body: dict) -> tuple[dict, list[str]]:
    """A stream read to [DONE]: its usage and each choice's finish reason."""
    usage, reasons = None, {}
    body = {"model": SERVED_NAME, "stream": True, "stream_options": {"include_usage": True}, **body}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    if c.get("finish_reason"):
                        reasons[c["index"]] = c["finish_reason"]
    return usage, list(reasons.values())


def _abort_stream(http: httpx.Client, prompt: list[int], n: int) -> None:
    """A stream the client leaves after its first chunk (the server aborts it)."""
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": ABORTED_MAX_TOKENS,
        "ignore_eos": True,
        "n": n,
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return


def run_workload(http: httpx.Client) -> Workload:
    w = Workload()
    for body in (
        {"prompt": "Once upon a time", "max_tokens": 5},
        {"prompt": "The cat", "max_tokens": 1},
        {"prompt": "Lily", "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 1},
        {"prompt": "A dog", "max_tokens": 30},  # may stop early: usage says how many came back
        {"prompt": "Tom", "max_tokens": 0, "echo": True, "logprobs": 1},  # the hidden token
    ):
        out = _post(http, "/v1/completions", body)
        w.answer(body, out["usage"], [c["finish_reason"] for c in out["choices"]])
    batch = {"prompt": ["One day", "The sun"], "max_tokens": 3, "n": 2, "temperature": 1.0}
    out = _post(http, "/v1/completions", batch)
    w.answer(batch, out["usage"], [c["finish_reason"] for c in out["choices"]], prompts=2)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    out = _post(http, "/v1/chat/completions", chat)
    w.answer(chat, out["usage"], [c["finish_reason"] for c in out["choices"]])
    for path, body in (
        ("/v1/completions", {"prompt": "Once", "max_tokens": 7, "n": 2, "temperature": 1.0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}),
    ):
        w.answer(body, *_stream(http, path, body))
    for n in (1, 2):
        prompt = [1, 400, 300, 200, 100]
        _abort_stream(http, prompt, n)
        w.prompt_tokens += len(prompt) * n
        w.engine_requests += 1
        w.aborted_choices += n
    return w


def _wait_for_aborts(http: httpx.Client, before: Scrape, aborted: int) -> Scrape:
    """The server ends an abandoned stream once it notices the hang-up: wait until both are counted."""
    deadline = time.monotonic() + 10
    while True:
        after = scrape(http)
        done = after.minus(before).total(mn.REQUEST_SUCCESS, finished_reason="abort")
        if done >= aborted or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workload(http) -> tuple[Workload, Scrape, Scrape]:
    before = scrape(http)
    w = run_workload(http)
    # Invalid requests: answered 400/404, never admitted, so not counted as tokens or requests.
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400
    assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    after = _wait_for_aborts(http, before, w.aborted_choices)
    return w, before, after


def test_counters_equal_the_workload(workload):
    w, before, after = workload
    d = after.minus(before)
    assert d.total(mn.PROMPT_TOKENS) == w.prompt_tokens
    assert d.total(mn.REQUEST_SUCCESS) == w.choices
    for reason, count in w.reasons.items():
        assert d.total(mn.REQUEST_SUCCESS, finished_reason=reason) == count, reason
    assert d.total(mn.REQUEST_SUCCESS, finished_reason="abort") == w.aborted_choices
    # The aborted streams' tokens are those of their last output seen, which the client cannot know; the
    # inter-token histogram (one observation per token after the first, per choice) tells them apart:
    itl = d.total(mn.INTER_TOKEN_LATENCY + "_count")
    visible = w.finished_choices - w.hidden_choices
    aborted_tokens = itl - (w.completion_tokens - visible) + w.aborted_choices
    assert w.aborted_choices <= aborted_tokens < ABORTED_MAX_TOKENS * w.aborted_choices
    assert d.total(mn.GENERATION_TOKENS) == w.completion_tokens + aborted_tokens


def test_histogram_counts_equal_the_choices(workload):
    w, before, after = workload
    d = after.minus(before)
    for name in HISTOGRAMS_PER_CHOICE:
        assert d.total(name + "_count") == w.choices, name
        assert d.total(name + "_bucket", le="+Inf") == w.choices, name
    assert d.total(mn.REQUEST_PROMPT_TOKENS + "_count") == w.choices
    assert d.total(mn.REQUEST_PROMPT_TOKENS + "_sum") == d.total(mn.PROMPT_TOKENS)
    assert d.total(mn.REQUEST_GENERATION_TOKENS + "_count") == w.choices
    assert d.total(mn.REQUEST_GENERATION_TOKENS + "_sum") == d.total(mn.GENERATION_TOKENS)
    assert d.total(mn.REQUEST_COST + "_count") == w.engine_requests
    assert d.total(mn.REQUEST_COST + "_sum") > 0
    assert d.total(mn.ENGINE_BUSY) > 0
    assert after.total(mn.COST_PER_MILLION_TOKENS) > 0


def test_histograms_hold_engine_times(workload):
    """Times are the engine's: queue + prefill <= TTFT <= E2E for the workload's sums, all positive."""
    _, before, after = workload
    d = after.minus(before)
    s = {name: d.total(name + "_sum") for name in HISTOGRAMS_PER_CHOICE}
    assert all(v >= 0 for v in s.values()), s
    assert s[mn.QUEUE_TIME] + s[mn.PREFILL_TIME] <= s[mn.TIME_TO_FIRST_TOKEN] + 1e-6
    assert s[mn.TIME_TO_FIRST_TOKEN] + s[mn.DECODE_TIME] <= s[mn.E2E_LATENCY] + 1e-6
    assert d.total(mn.ITERATION_TOKENS + "_sum") >= d.total(mn.GENERATION_TOKENS)


def test_goodput_counts_every_choice_and_the_good_ones(workload):
    """The fixture's targets are loose: every finished choice meets them, no aborted one is good."""
    w, before, after = workload
    d = after.minus(before)
    assert d.total(mn.SLO_REQUESTS) == w.choices
    assert d.total(mn.SLO_GOOD_REQUESTS) == w.finished_choices


def test_errors_by_status_and_kind(workload):
    _, before, after = workload
    d = after.minus(before)
    # kind: the OpenAI error code, else its type (max_tokens: -1 has no code).
    assert d.total(mn.REQUEST_ERRORS, status="400", kind="invalid_request_error") == 1
    assert d.total(mn.REQUEST_ERRORS, status="404", kind="model_not_found") == 1
    assert d.total(mn.REQUEST_TIMEOUTS) == 0


def test_exposition_parses_and_every_series_is_declared_with_its_labels(http):
    text = http.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    for family in families:
        for sample in family.samples:
            spec = mn.spec_of_sample(sample.name)
            if spec is None:
                assert sample.name.startswith(("python_", "process_")), sample.name  # prometheus-client's own
                continue
            labels = set(sample.labels) - {"le"}
            assert labels == set(spec.labels), (sample.name, sample.labels)
            if spec.labels:
                assert sample.labels[mn.MODEL_NAME] == SERVED_NAME
    undeclared_process = {n for n in names if n.startswith("process_")} - {
        s.name.removesuffix("_total") for s in mn.PROCESS_METRICS
    }
    assert not undeclared_process
    assert "process_resident_memory" in names or "process_resident_memory_bytes" in names


def test_name_filter_returns_only_the_named_series(http):
    """`name[]` (prometheus_client's filter, as vLLM's /metrics): only those series, a small fraction of the
    full exposition, which the gateway's parser reads (its scrape every second asks for these two)."""
    wanted = [mn.NUM_REQUESTS_WAITING, mn.KV_CACHE_USAGE]
    r = http.get("/metrics", params={"name[]": wanted})
    assert r.status_code == 200
    families = list(text_string_to_metric_families(r.text))
    assert {s.name for f in families for s in f.samples} == set(wanted)
    assert len(r.content) < len(http.get("/metrics").content) / 20
    assert parse_gauges(r.text, tuple(wanted))[mn.KV_CACHE_USAGE] >= 0


def test_resources_state_and_cache_config(http):
    s = scrape(http)
    info = [dict(labels) for (name, labels) in s.samples if name == mn.CACHE_CONFIG_INFO]
    assert len(info) == 1 and info[0]["block_size"] == "16" and int(info[0]["num_gpu_blocks"]) > 0
    assert s.total(mn.READY) == 1 and s.total(mn.ENGINE_HEALTHY) == 1
    assert abs(s.total(mn.ENGINE_LAST_STEP) - time.time()) < 600
    processes = {dict(labels)["process"] for (name, labels) in s.samples if name == mn.CPU_SECONDS}
    assert processes == {"server", "engine_core"}
    assert s.total(mn.RESIDENT_MEMORY, process="engine_core") > 1 << 20
    assert s.total(mn.NETWORK_RECEIVE) > 0
    # The server runs on CPU: no allocator series; NVML's only where a driver is (absent, not zero).
    gpu = {n for (n, _) in s.samples if n.startswith("shoal:gpu_")}
    assert gpu == ({mn.GPU_UTILIZATION, mn.GPU_MEMORY_USED} if _nvml_works() else set()), gpu


def test_running_gauge_drops_after_an_abort_without_another_step(http):
    """An abort that empties the batch is seen at the next scrape; no other request needs to run."""
    _abort_stream(http, [1, 2, 3], 2)
    deadline = time.monotonic() + 10
    while scrape(http).total(mn.NUM_REQUESTS_RUNNING) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scrape(http).total(mn.NUM_REQUESTS_RUNNING) == 0
    assert scrape(http).total(mn.NUM_REQUESTS_WAITING) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("disabled", [False, True], ids=["metrics-on", "disable-log-stats"])
def test_thread_engine_counts_and_disable_log_stats_stops_it(disabled):
    """In process, with the thread engine: a request is counted; with --disable-log-stats it moves no
    counter or histogram, and the scrape-time gauges stay."""
    import asyncio

    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = AsyncEngine.from_config(
        EngineConfig(model=str(TINY_MODEL), dtype="float32", kv_cache_memory=8 << 20)
    )
    app = build_app(engine, ServerSettings(served_model_name="tiny", disable_log_stats=disabled))

    async def run() -> tuple[dict, Scrape]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            body = {"prompt": "Once", "max_tokens": 3, "ignore_eos": True, "n": 2, "temperature": 1.0}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200
            return r.json()["usage"], Scrape.parse((await c.get("/metrics")).text)

    usage, s = asyncio.run(run())
    on = 0 if disabled else 1
    assert s.total(mn.PROMPT_TOKENS) == on * usage["prompt_tokens"] * 2
    assert s.total(mn.GENERATION_TOKENS) == on * usage["completion_tokens"] == on * 6
    assert s.total(mn.E2E_LATENCY + "_count") == on * 2
    assert s.total(mn.INTER_TOKEN_LATENCY + "_count") == on * 4
    assert (s.total(mn.BATCH_SIZE + "_count") > 0) == (not disabled)
    assert s.total(mn.READY) == 1 and s.total(mn.ENGINE_LAST_STEP) > 0
    assert (mn.NUM_REQUESTS_RUNNING, (("model_name", "tiny"),)) in s.samples


def _nvml_works() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    return pynvml.nvmlDeviceGetCount() > 0


def _exposition(*collectors) -> Scrape:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return Scrape.parse(generate_latest(registry).decode())


def test_gpu_series_with_a_gpu(monkeypatch):
    """No GPU here, so NVML is replaced by a stand-in of its API (the calls shoal makes, nothing else);
    the allocator series come from real EngineStats as a CUDA engine fills them."""
    import types

    from shoal.engine.stats import EngineStats
    from shoal.server.metrics_collectors import EngineStatsCollector, GpuCollector

    nvml = types.SimpleNamespace(
        NVMLError=RuntimeError,
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40 + h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) << 30),
    )
    monkeypatch.setitem(__import__("sys").modules, "pynvml", nvml)
    stats = EngineStats(cuda_device=1, cuda_memory_allocated=5 << 20, cuda_memory_reserved=8 << 20)
    engine = types.SimpleNamespace(stats=stats)
    s = _exposition(GpuCollector("m"), EngineStatsCollector(engine, "m"))
    assert s.total(mn.GPU_UTILIZATION, gpu="1", model_name="m") == 41
    assert s.total(mn.GPU_MEMORY_USED, gpu="0") == 1 << 30
    assert s.total(mn.GPU_MEMORY_ALLOCATED, gpu="1") == 5 << 20
    assert s.total(mn.GPU_MEMORY_RESERVED, gpu="1") == 8 << 20


def test_gpu_series_are_absent_without_nvml_or_cuda():
    """The real nvidia-ml-py without a driver raises NVMLError_LibraryNotFound: no GPU series at all."""
    import types

    if _nvml_works():
        pytest.skip("this machine has a GPU")

    from shoal.engine.stats import EngineStats
    from shoal.server.metrics_collectors import EngineStatsCollector, GpuCollector

    s = _exposition(GpuCollector("m"), EngineStatsCollector(types.SimpleNamespace(stats=EngineStats()), "m"))
    assert not [name for name, _ in s.samples if name.startswith("shoal:gpu_")]
    assert s.total(mn.NUM_REQUESTS_RUNNING) == 0


def test_a_timed_out_request_is_counted_with_its_partial_output(http):
    """X-Request-Timeout ends a long request with its partial text and finish reason "abort": one timeout,
    one aborted choice, and its returned tokens counted as generated."""
    before = scrape(http)
    body = {"model": SERVED_NAME, "prompt": "Once", "max_tokens": ABORTED_MAX_TOKENS, "ignore_eos": True}
    r = http.post("/v1/completions", json=body, headers={"X-Request-Timeout": "0.1"})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "abort"
    d = scrape(http).minus(before)
    assert d.total(mn.REQUEST_TIMEOUTS) == 1
    assert d.total(mn.REQUEST_SUCCESS, finished_reason="abort") == 1
    assert d.total(mn.GENERATION_TOKENS) == r.json()["usage"]["completion_tokens"] > 0
    assert d.total(mn.E2E_LATENCY + "_sum") >= 0.1
