"""Shadow traffic: a sampled share of requests is sent again, after the user has their answer, to a shadow
version whose answer is only compared, never returned (the "dark launch" / traffic mirroring of Envoy and
Istio, with the output comparison an LLM rollout needs).

Compared on text, so any two models can be compared whatever their tokenizers: exact-match rate,
token-level agreement (words at the same position that are equal, over the longer answer), and the
differences in length (characters) and latency. A shadow failure is counted and logged, nothing more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass

import httpx

from shoal.gateway.config import Shadow
from shoal.gateway.metrics import GatewayMetrics

logger = logging.getLogger("shoal.gateway")


def answer_text(body: bytes) -> str | None:
    """The first choice's text from a JSON completion/chat answer or from its server-sent events."""
    text = body.decode(errors="replace")
    if text.lstrip().startswith("{"):
        try:
            return _choice_text(json.loads(text), "message")
        except (ValueError, KeyError, IndexError, TypeError):
            return None
    parts = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            try:
                parts.append(_choice_text(json.loads(line[5:]), "delta") or "")
            except (ValueError, KeyError, IndexError, TypeError):
                continue
    return "".join(parts) if parts else None


def _choice_text(obj: dict, field: str) -> str | None:
    choice = obj["choices"][0] if obj.get("choices") else {}
    if "text" in choice:
        return choice["text"]
    return (choice.get(field) or {}).get("content")


def token_agreement(a: str, b: str) -> float:
    """Share of word positions where the two texts agree, over the longer one (1.0 for two empty texts)."""
    wa, wb = a.split(), b.split()
    longest = max(len(wa), len(wb))
    return sum(x == y for x, y in zip(wa, wb, strict=False)) / longest if longest else 1.0


@dataclass
class ShadowStats:
    compared: int = 0
    failed: int = 0
    skipped: int = 0
    exact: int = 0
    agreement_sum: float = 0.0
    length_diff_sum: float = 0.0
    latency_diff_sum: float = 0.0

    def describe(self) -> dict:
        n = self.compared or 1
        return {
            "compared": self.compared,
            "failed": self.failed,
            "skipped": self.skipped,
            "exact_match_rate": self.exact / n if self.compared else None,
            "token_agreement": self.agreement_sum / n if self.compared else None,
            "mean_length_diff_chars": self.length_diff_sum / n if self.compared else None,
            "mean_latency_diff_s": self.latency_diff_sum / n if self.compared else None,
        }


class ShadowRunner:
    def __init__(self, model: str, spec: Shadow, metrics: GatewayMetrics, timeout_s: float):
        self.model, self.spec, self.metrics = model, spec, metrics
        self.stats = ShadowStats()
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def sampled(self) -> bool:
        return random.random() < self.spec.sample_rate

    def submit(self, url: str, path: str, body: dict, primary: bytes, primary_latency_s: float) -> None:
        """Fire and forget; past `max_in_flight` the shadow is skipped so it never queues behind users."""
        if self._in_flight >= self.spec.max_in_flight:
            self.count("skipped")
            return
        self._in_flight += 1
        task = asyncio.create_task(self._run(url, path, body, primary, primary_latency_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, url: str, path: str, body: dict, primary: bytes, primary_latency_s: float) -> None:
        try:
            start = time.monotonic()
            body = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
            resp = await self._client.post(url + path, json=body)
            latency = time.monotonic() - start
            resp.raise_for_status()
            shadow_text, primary_text = answer_text(resp.content), answer_text(primary)
            if shadow_text is None or primary_text is None:
                raise ValueError("no answer text to compare")
            self._compare(primary_text, shadow_text, latency - primary_latency_s)
        except Exception as e:  # noqa: BLE001 -- whatever the shadow does, users never see it
            self.count("failed")
            logger.info("shadow %s failed: %s: %s", self.model, type(e).__name__, e)
        finally:
            self._in_flight -= 1

    def _compare(self, primary: str, shadow: str, latency_diff: float) -> None:
        s, m = self.stats, self.metrics
        agreement = token_agreement(primary, shadow)
        s.compared += 1
        s.exact += primary == shadow
        s.agreement_sum += agreement
        s.length_diff_sum += len(shadow) - len(primary)
        s.latency_diff_sum += latency_diff
        m.shadow_requests.labels(self.model, "compared").inc()
        if primary == shadow:
            m.shadow_exact.labels(self.model).inc()
        m.shadow_agreement.labels(self.model).observe(agreement)
        m.shadow_length_diff.labels(self.model).observe(len(shadow) - len(primary))
        m.shadow_latency_diff.labels(self.model).observe(latency_diff)

    def count(self, outcome: str) -> None:
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        self.metrics.shadow_requests.labels(self.model, outcome).inc()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._client.aclose()
