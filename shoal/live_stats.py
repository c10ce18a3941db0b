"""`shoal stats --url URL`: latency percentiles and throughput of a live server, from its /metrics.

Two scrapes `interval` seconds apart: RPS and TPS are the counters' increase between them divided by
the time between them; the P50/P95/P99 of TTFT, TPOT and E2E come from the histograms' increase over the
same window, or from the whole life of the server when no request ended in the window. Percentiles are
estimated as Prometheus's histogram_quantile() does: linear interpolation inside the bucket where the
rank falls (prometheus/promql/quantile.go, bucketQuantile), so they are exact to within one bucket.

No torch, no engine, no HTTP client beyond the standard library: it runs anywhere shoal is installed.
"""

from __future__ import annotations

import math
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from shoal import metric_names as mn

LabelSet = tuple[tuple[str, str], ...]
QUANTILES = (0.5, 0.95, 0.99)
LATENCIES = (
    ("TTFT", mn.TIME_TO_FIRST_TOKEN),
    ("TPOT", mn.TIME_PER_OUTPUT_TOKEN),
    ("E2E", mn.E2E_LATENCY),
)


@dataclass
class Scrape:
    """One /metrics scrape: every sample by (sample name, sorted labels), and when it was taken
    (time.monotonic() seconds)."""

    samples: dict[tuple[str, LabelSet], float]
    at: float = field(default_factory=time.monotonic)

    @classmethod
    def parse(cls, text: str, at: float | None = None) -> Scrape:
        """Parse the Prometheus text format (ValueError if it is not)."""
        return cls(_samples(text_string_to_metric_families(text)), time.monotonic() if at is None else at)

    @classmethod
    def of_registry(cls, registry) -> Scrape:
        """The samples of a prometheus_client CollectorRegistry, read in-process (what /metrics would
        render, without the text round trip)."""
        return cls(_samples(registry.collect()))

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram, summed over its label sets, by bound."""
        sums: dict[float, float] = {}
        for (name, labels), value in self.samples.items():
            if name == histogram + "_bucket":
                le = float(dict(labels)["le"])
                sums[le] = sums.get(le, 0.0) + value
        return sorted(sums.items())

    def minus(self, earlier: Scrape) -> Scrape:
        """The increase of every sample since `earlier` (meaningful for counters and histograms)."""
        return Scrape({k: v - earlier.samples.get(k, 0.0) for k, v in self.samples.items()}, self.at)


def _samples(families) -> dict[tuple[str, LabelSet], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def fetch(url: str, timeout: float = 10.0) -> Scrape:
    """Scrape URL's /metrics (URL is the server's base URL). Raises OSError (URLError) if unreachable,
    ValueError if the answer is not the Prometheus text format."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as response:
        return Scrape.parse(response.read().decode())


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile for one histogram: NaN without observations; the highest finite
    bound when the rank falls in the +Inf bucket; else linear interpolation inside the bucket (from 0
    for the first one)."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class Summary:
    """What `shoal stats` prints: seconds for percentiles, per second for rates."""

    percentiles: dict[str, dict[float, float]]  # "TTFT" -> {0.5: seconds, ...}
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    window_s: float
    whole_life: bool  # percentiles over the server's whole life (no request ended in the window)


def summarize(before: Scrape, after: Scrape) -> Summary:
    """Percentiles over the requests that ended between the two scrapes (or over all, if none did)
    and rates over the time between them."""
    window = after.minus(before)
    seconds = max(after.at - before.at, 1e-9)
    whole_life = window.total(mn.E2E_LATENCY + "_count") <= 0
    source = after if whole_life else window
    percentiles = {
        label: {q: bucket_quantile(q, source.buckets(name)) for q in QUANTILES} for label, name in LATENCIES
    }
    return Summary(
        percentiles=percentiles,
        requests_per_s=window.total(mn.REQUEST_SUCCESS) / seconds,
        output_tokens_per_s=window.total(mn.GENERATION_TOKENS) / seconds,
        prompt_tokens_per_s=window.total(mn.PROMPT_TOKENS) / seconds,
        window_s=seconds,
        whole_life=whole_life,
    )


def table(summary: Summary, url: str):
    """The summary as a rich Table (milliseconds for latencies)."""
    from rich.table import Table

    scope = "since start" if summary.whole_life else f"last {summary.window_s:.1f} s"
    t = Table(title=f"shoal stats: {url}", caption=f"latency percentiles {scope}; rates over the last "
              f"{summary.window_s:.1f} s")  # fmt: skip
    t.add_column("metric")
    for q in QUANTILES:
        t.add_column(f"P{round(q * 100)}", justify="right")
    for label, values in summary.percentiles.items():
        t.add_row(f"{label} (ms)", *(_ms(values[q]) for q in QUANTILES))
    t.add_section()
    t.add_row("requests/s", f"{summary.requests_per_s:.2f}", "", "")
    t.add_row("output tokens/s", f"{summary.output_tokens_per_s:.1f}", "", "")
    t.add_row("prompt tokens/s", f"{summary.prompt_tokens_per_s:.1f}", "", "")
    return t


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def run(url: str, interval: float) -> Summary:
    """Scrape, wait `interval` seconds, scrape again, summarize."""
    before = fetch(url)
    time.sleep(interval)
    return summarize(before, fetch(url))
