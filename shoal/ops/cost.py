"""`shoal cost`: what serving costs, from a measured throughput at an SLA and a file of instance prices.

Inputs:
- a `shoal bench serve --goodput ...` result (shoal/bench/serve.py), measured on one instance type of the
  price file: its goodput, the requests and output tokens per second that met every SLA target (without
  targets, its plain throughput stands in, and the report says so). Other types can be measured too.
- a price file (YAML or JSON; deploy/prices.example.yaml holds EXAMPLE prices): instance types with CPUs,
  GPUs, memory, on-demand and spot dollars per hour.

What it computes, per instance type (prices p in $/h, goodput R requests/s and T output tokens/s):
- dollars per 1M output tokens, p / (3600 T) x 1e6, and per request, p / (3600 R), on demand and spot;
  the instance is paid by the hour whether busy or not, so these hold at the measured load. (The server's
  own `shoal:cost_per_million_tokens_dollars`, with `--cost-per-hour`, charges only engine-busy seconds: a
  lower bound of the same figure, with the same price per second, p / 3600.)
- replicas for a target load (requests/s or output tokens/s): ceil(target / R), and the fleet's $/h;
- right-sizing: the type whose fleet costs least per hour at the target load, among those with at least
  `min_memory_gib` of memory and a throughput (measured, or scaled);
- savings on the chosen type: quantization and prefix caching as throughput ratios at the same SLA (from
  a second bench result on the same instance type, or given), spot as the spot/on-demand price ratio, and
  all of them together (the ratios multiply).

Scaling assumption, for a type without a measurement of its own: throughput grows linearly with the CPU
count from the measured CPU type (GPU count for GPU types), i.e. one replica per measured-size slice of the
instance, with no shared bottleneck (memory bandwidth, a shared L3) between them. It is optimistic for big
instances; measure the type you buy (`measured`) before trusting it. CPU and GPU types never scale into
each other: a type of the other kind without a measurement is listed as "not measured".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class InstanceType(BaseModel):
    """One priced instance type of the price file."""

    model_config = ConfigDict(extra="forbid")
    name: str
    cpus: int = Field(gt=0)
    gpus: int = Field(ge=0, default=0)
    memory_gib: float = Field(gt=0)
    on_demand_per_hour: float = Field(gt=0)
    spot_per_hour: float | None = Field(gt=0, default=None)


class PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: str = "USD"
    note: str = ""
    instances: list[InstanceType] = Field(min_length=1)


def load_prices(path: Path) -> PriceFile:
    """A price file (.yaml/.yml or .json). ValueError naming the file and the bad field."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
        prices = PriceFile.model_validate(data)
    except (ValidationError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a price file: {e}") from None
    names = [i.name for i in prices.instances]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: instance names must be unique, got {names}")
    return prices


@dataclass
class Throughput:
    """Requests and output tokens per second meeting the SLA on one instance, and where they come from."""

    requests_per_s: float
    output_tokens_per_s: float
    source: str


def measured_throughput(result: dict, label: str) -> Throughput:
    """Goodput of a `shoal bench serve` result (throughput where it had no --goodput targets). ValueError
    for another JSON, or a run where no request met the SLA."""
    if result.get("benchmark") != "bench_serve":
        raise ValueError(f"{label}: not a `shoal bench serve` result")
    if result.get("goodput_targets_ms"):
        targets = " ".join(f"{k}:{v:g}" for k, v in result["goodput_targets_ms"].items())
        rps, tps = result["request_goodput"], result["goodput_output_throughput"]
        source = f"goodput at {targets} ms ({label})"
    else:
        rps, tps = result["request_throughput"], result["output_throughput"]
        source = f"throughput, no SLA targets ({label})"
    if not rps or not tps:
        raise ValueError(f"{label}: no request met the SLA (goodput 0): nothing to price")
    return Throughput(rps, tps, source)


def scaled(base: Throughput, base_type: InstanceType, other: InstanceType) -> Throughput | None:
    """`base` measured on base_type, scaled to `other` by CPU count (GPU count for GPU types); None
    between a CPU and a GPU type (see the module docstring)."""
    if (base_type.gpus > 0) != (other.gpus > 0):
        return None
    factor = other.gpus / base_type.gpus if base_type.gpus else other.cpus / base_type.cpus
    if factor == 1:
        return Throughput(base.requests_per_s, base.output_tokens_per_s, base.source)
    return Throughput(base.requests_per_s * factor, base.output_tokens_per_s * factor,
                      f"scaled x{factor:g} by {'GPU' if base_type.gpus else 'CPU'} count from {base_type.name}")  # fmt: skip


@dataclass
class Target:
    """The load to size for: requests/s or output tokens/s (one of them)."""

    requests_per_s: float | None = None
    output_tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        values = [v for v in (self.requests_per_s, self.output_tokens_per_s) if v is not None]
        if len(values) > 1 or any(v <= 0 for v in values):
            raise ValueError("give one target load, requests/s or output tokens/s, and > 0")

    @property
    def given(self) -> bool:
        return self.requests_per_s is not None or self.output_tokens_per_s is not None

    def replicas(self, t: Throughput) -> int | None:
        if self.requests_per_s is not None:
            return math.ceil(self.requests_per_s / t.requests_per_s - 1e-9)
        if self.output_tokens_per_s is not None:
            return math.ceil(self.output_tokens_per_s / t.output_tokens_per_s - 1e-9)
        return None


@dataclass
class InstanceCost:
    """One row of the report (dollars; None where a type has no throughput or no spot price)."""

    name: str
    cpus: int
    gpus: int
    memory_gib: float
    on_demand_per_hour: float
    spot_per_hour: float | None
    throughput_source: str
    requests_per_s: float | None = None
    output_tokens_per_s: float | None = None
    per_million_tokens: float | None = None
    per_million_tokens_spot: float | None = None
    per_request: float | None = None
    replicas: int | None = None
    fleet_per_hour: float | None = None
    fleet_per_hour_spot: float | None = None
    fits: bool = True


def per_million(price_per_hour: float | None, tokens_per_s: float) -> float | None:
    return None if price_per_hour is None else price_per_hour / (3600 * tokens_per_s) * 1e6


def instance_cost(
    it: InstanceType, t: Throughput | None, target: Target, min_memory_gib: float
) -> InstanceCost:
    row = InstanceCost(it.name, it.cpus, it.gpus, it.memory_gib, it.on_demand_per_hour, it.spot_per_hour,
                       t.source if t else "not measured (no scaling between CPU and GPU types)",
                       fits=it.memory_gib >= min_memory_gib)  # fmt: skip
    if t is None:
        return row
    row.requests_per_s, row.output_tokens_per_s = t.requests_per_s, t.output_tokens_per_s
    row.per_million_tokens = per_million(it.on_demand_per_hour, t.output_tokens_per_s)
    row.per_million_tokens_spot = per_million(it.spot_per_hour, t.output_tokens_per_s)
    row.per_request = it.on_demand_per_hour / (3600 * t.requests_per_s)
    row.replicas = target.replicas(t)
    if row.replicas is not None:
        row.fleet_per_hour = row.replicas * it.on_demand_per_hour
        row.fleet_per_hour_spot = row.replicas * it.spot_per_hour if it.spot_per_hour else None
    return row


@dataclass
class Saving:
    name: str
    factor: float  # cost multiplier: 1 / throughput ratio, or spot / on-demand price
    per_million_tokens: float | None
    saving: float  # 1 - factor
    source: str


def savings(row: InstanceCost, ratios: dict[str, tuple[float, str]]) -> list[Saving]:
    """Per 1M output tokens on `row`: each throughput ratio (name -> (ratio, source)), spot, and all."""
    base = row.per_million_tokens
    items = [(name, 1 / r, src) for name, (r, src) in ratios.items()]
    if row.spot_per_hour:
        items.append(("spot", row.spot_per_hour / row.on_demand_per_hour, "the price file"))
    out = [Saving(n, f, base * f if base is not None else None, 1 - f, s) for n, f, s in items]
    if len(items) > 1:
        together = math.prod(f for _, f, _ in items)
        out.append(Saving("all of the above", together, base * together if base is not None else None,
                          1 - together, "the factors multiplied"))  # fmt: skip
    return out


def throughput_ratio(base: dict, other: dict, label: str) -> tuple[float, str]:
    """Goodput output tokens/s of `other` over `base` (two bench results on the same instance type)."""
    a, b = measured_throughput(base, "base"), measured_throughput(other, label)
    return b.output_tokens_per_s / a.output_tokens_per_s, f"{label}: {b.source}"


def compute(
    prices: PriceFile,
    measured: dict[str, Throughput],
    target: Target,
    ratios: dict[str, tuple[float, str]],
    min_memory_gib: float = 0.0,
) -> dict:
    """The report: a row per instance type, the right-sized choice and its savings. `measured` maps
    instance type names (of the price file; ValueError otherwise) to their throughput at the SLA; the
    first one is the base the others scale from."""
    by_name = {i.name: i for i in prices.instances}
    unknown = [n for n in measured if n not in by_name]
    if unknown or not measured:
        raise ValueError(
            f"measured instance types {unknown or '(none)'} not in the price file {sorted(by_name)}"
        )
    base_name = next(iter(measured))
    rows = []
    for it in prices.instances:
        t = measured.get(it.name) or scaled(measured[base_name], by_name[base_name], it)
        rows.append(instance_cost(it, t, target, min_memory_gib))
    candidates = [r for r in rows if r.fits and r.per_million_tokens is not None]
    by = "fleet_per_hour" if target.given else "per_million_tokens"
    chosen = min(candidates, key=lambda r: (getattr(r, by), r.per_million_tokens), default=None)
    return {
        "currency": prices.currency,
        "price_note": prices.note,
        "target": asdict(target),
        "min_memory_gib": min_memory_gib,
        "base_instance": base_name,
        "instances": [asdict(r) for r in rows],
        "right_size": chosen.name if chosen else None,
        "right_size_by": "fleet cost per hour at the target" if target.given else "cost per 1M output tokens",
        "savings": [asdict(s) for s in savings(chosen, ratios)] if chosen else [],
    }


# ---- output -----------------------------------------------------------------------------------------
def _money(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(report: dict) -> list:
    """The report as rich Tables: instance types, then the savings on the right-sized one."""
    from rich.table import Table

    cur = report["currency"]
    t = Table(title=f"shoal cost ({cur}; {report['price_note'] or 'prices from the price file'})")
    heads = ("instance", "CPUs", "GPUs", "mem GiB", "req/s at SLA", "out tok/s at SLA", f"{cur}/1M tok",
             f"{cur}/1M tok spot", f"{cur}/1k requests", "replicas", f"{cur}/h fleet", f"{cur}/h fleet spot")  # fmt: skip
    for h in heads:
        t.add_column(h, justify="left" if h == "instance" else "right")
    for r in report["instances"]:
        mark = " *" if r["name"] == report["right_size"] else ("" if r["fits"] else " (too small)")
        t.add_row(r["name"] + mark, str(r["cpus"]), str(r["gpus"]), f"{r['memory_gib']:g}",
                  _money(r["requests_per_s"], 2), _money(r["output_tokens_per_s"], 1),
                  _money(r["per_million_tokens"]), _money(r["per_million_tokens_spot"]),
                  _money(r["per_request"] and r["per_request"] * 1e3), "-" if r["replicas"] is None else str(r["replicas"]),
                  _money(r["fleet_per_hour"], 2), _money(r["fleet_per_hour_spot"], 2))  # fmt: skip
    s = Table(title=f"savings on {report['right_size']} (per 1M output tokens)")
    for h in ("saving from", "cost factor", f"{cur}/1M tok", "saving", "source"):
        s.add_column(h, justify="left" if h in ("saving from", "source") else "right")
    for x in report["savings"]:
        s.add_row(x["name"], f"{x['factor']:.3f}", _money(x["per_million_tokens"]), f"{x['saving']:.0%}",
                  x["source"])  # fmt: skip
    return [t, s]


def notes(report: dict) -> list[str]:
    """Where each row's throughput comes from, and the choice."""
    lines = [f"{r['name']}: {r['throughput_source']}" for r in report["instances"]]
    target = {k: v for k, v in report["target"].items() if v is not None}
    lines.append(f"right-sized ({report['right_size_by']}; target {target or 'none'}, memory >= "
                 f"{report['min_memory_gib']:g} GiB): {report['right_size'] or 'no instance type qualifies'}")  # fmt: skip
    return lines


def run(
    bench: Path,
    prices_path: Path,
    instance: str,
    measured: list[str],
    target_rps: float | None,
    target_output_tps: float | None,
    min_memory_gib: float,
    extras: dict[str, tuple[Path | None, float | None]],
) -> dict:
    """`shoal cost`'s inputs as the CLI gives them (files and TYPE=FILE strings) -> compute()'s report.
    extras: saving name -> (a bench result on `instance`, or a goodput ratio); neither: left out."""
    base = json.loads(Path(bench).read_text())
    through = {instance: measured_throughput(base, Path(bench).name)}
    for item in measured:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--measured takes TYPE=RESULT.json, got {item!r}")
        through[name] = measured_throughput(json.loads(Path(path).read_text()), Path(path).name)
    ratios = {}
    for name, (path, ratio) in extras.items():
        if path is not None and ratio is not None:
            raise ValueError(f"{name}: give a bench result or a ratio, not both")
        if path is not None:
            ratios[name] = throughput_ratio(base, json.loads(Path(path).read_text()), Path(path).name)
        elif ratio is not None:
            if ratio <= 0:
                raise ValueError(f"{name}: the ratio must be > 0, got {ratio}")
            ratios[name] = (ratio, "given")
    return compute(
        load_prices(prices_path), through, Target(target_rps, target_output_tps), ratios, min_memory_gib
    )
