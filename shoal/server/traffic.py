"""The traffic policies at work on the HTTP side: caps, rate limits, shedding, degradation, the breaker.

Two hooks, because what they need is known at different times:
- `TrafficMiddleware` (pure ASGI, around the generation routes) runs before the body is read: the circuit
  breaker (503 while open), the request-rate limits (429), and, with priority classes, shedding of a
  class that is shed at this load (so that refusing a spike costs no parsing or tokenizing). When the response has been sent in full it
  records the request's completion tokens, its outcome for the breaker and its latency for the queue-wait
  estimate, and it adds the `x-ratelimit-*` and `x-shoal-degraded` headers to every answer.
- `admit_jobs`, called by `generation.run_jobs` once the prompt is tokenized: the prompt-token cap, then
  (`TrafficGuard.admit_jobs`) shedding and degraded mode, and the token-rate limits.
- `evictable`, around the wait for a request's first outputs: while it waits, a more urgent arrival that
  would be shed takes its place instead, and it is answered 503 (the lowest priority is shed first, also
  once queued).

The policies themselves are in `shoal/policy` (caps, ratelimit, shedding, breaker); this module turns
their verdicts into HTTP answers in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.policy.breaker import CircuitBreaker
from shoal.policy.caps import CapExceeded, Caps, InputLimits
from shoal.policy.config import PolicyConfig
from shoal.policy.identity import ANONYMOUS
from shoal.policy.ratelimit import Decision, Quota, RequestLimiter, TokenCounter, scopes_of
from shoal.policy.ratelimit import Scope as LimitScope
from shoal.policy.shedding import DEGRADED_HEADER, Load, SheddingPolicy, verdict
from shoal.server.errors import SERVER_ERROR, APIError, error_response
from shoal.server.protocol import ChatCompletionRequest, CompletionRequest
from shoal.server.request_context import RequestContext, request_context

logger = logging.getLogger("shoal.server")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
RATE_LIMIT_CODE = "rate_limit_exceeded"  # OpenAI's code for a 429
LATENCY_EWMA_ALPHA = 0.2  # weight of the newest request in the mean latency of the queue-wait estimate
T = TypeVar("T")


def caps_of(policy: PolicyConfig | None, max_tokens_cap: int | None, max_n: int | None) -> Caps:
    """The caps in force: the policy's `limits` (defaults without a policy) under the server flags."""
    return Caps(policy.limits if policy is not None else InputLimits(), max_tokens_cap, max_n)


def cap_error(e: CapExceeded) -> APIError:
    return APIError(str(e), param=e.param, code=e.code)


def apply_caps(caps: Caps, body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for a request over a cap; control characters are handled as the policy says (the body's
    prompt or messages are edited in place when they are stripped)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    explicit = body.model_fields_set
    try:
        if isinstance(body, ChatCompletionRequest):
            param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            caps.check_request(
                n=body.n,
                max_tokens=body.requested_max_tokens,
                max_tokens_param=param,
                stop=stop,
                logit_bias=len(body.logit_bias or {}),
                top_logprobs=body.top_logprobs if body.logprobs else None,
                top_logprobs_param="top_logprobs",
                messages=len(body.messages),
            )
            _clean_messages(caps, body)
        else:
            caps.check_request(
                n=body.n,
                max_tokens=body.max_tokens if "max_tokens" in explicit else None,
                max_tokens_param="max_tokens",
                stop=stop,
                logit_bias=len(body.logit_bias or {}),
                top_logprobs=body.logprobs,
                top_logprobs_param="logprobs",
            )
            _clean_prompt(caps, body)
    except CapExceeded as e:
        raise cap_error(e) from e


def capped_default(caps: Caps, default: int) -> int:
    """The max_tokens of a request that gives none: the endpoint's default, under --max-tokens-cap."""
    return default if caps.max_tokens is None else min(default, caps.max_tokens)


def _clean_messages(caps: Caps, body: ChatCompletionRequest) -> None:
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            message.content = caps.clean_text(message.content, f"messages.{i}.content")
        else:
            for j, part in enumerate(message.content):
                part.text = caps.clean_text(part.text, f"messages.{i}.content.{j}.text")


def _clean_prompt(caps: Caps, body: CompletionRequest) -> None:
    if isinstance(body.prompt, str):
        body.prompt = caps.clean_text(body.prompt, "prompt")
    elif body.prompt and isinstance(body.prompt[0], str):
        body.prompt = [caps.clean_text(p, f"prompt.{i}") for i, p in enumerate(body.prompt)]


async def admit_jobs(request: Request, jobs: list[Any]) -> None:
    """The checks that need the tokenized prompt (generation.run_jobs calls this before the engine)."""
    state = request.app.state.shoal
    total = sum(len(job.prompt_ids) for job in jobs)
    try:
        state.caps.check_prompt_tokens(
            total, "messages" if request.url.path.endswith("chat/completions") else "prompt"
        )
    except CapExceeded as e:
        raise cap_error(e) from e
    ticket = ticket_of(request)
    if state.traffic is not None and ticket is not None:
        await state.traffic.admit_jobs(ticket, jobs)


# ---- per request ------------------------------------------------------------------------------------


@dataclass
class Ticket:
    """One generation request's passage through the policies (kept in the ASGI scope's state)."""

    scopes: list[LimitScope]
    headers: dict[str, str] = field(default_factory=dict)
    engine_requests: int = 0  # admitted by admit_jobs: counted in the guard's in-flight total
    priority: int = 0  # its most urgent engine request's
    arrival: float = 0.0  # time.monotonic() at admission
    waiting: asyncio.Future | None = None  # its wait for the first outputs, while it lasts
    evicted: bool = False


def ratelimit_headers(kind: str, quota: Quota | None) -> dict[str, str]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for one quota."""
    if quota is None:
        return {}
    return {
        f"x-ratelimit-limit-{kind}": str(quota.limit),
        f"x-ratelimit-remaining-{kind}": str(quota.remaining),
        f"x-ratelimit-reset-{kind}": duration(quota.reset_s),
    }


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest_s = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{rest_s}" if minutes else rest_s


def too_many(kind: str, decision: Decision, window_s: int) -> APIError:
    """The 429 of a refused request, with Retry-After and the refusing limit's x-ratelimit-* headers (the
    middleware adds those of the other kind)."""
    quota, scope = decision.quota, decision.scope
    retry = max(1, math.ceil(quota.retry_after_s))
    return APIError(
        f"Rate limit reached for {scope.kind} {scope.name!r} on {kind} per {window_s} s: "
        f"limit {quota.limit}, remaining {quota.remaining}. Please try again in {retry} s.",
        429,
        code=RATE_LIMIT_CODE,
        headers={**ratelimit_headers(kind, quota), "Retry-After": str(retry)},
    )


# ---- the guard --------------------------------------------------------------------------------------


class TrafficGuard:
    """The policies of one server, with the state they share (in-flight requests, latency, breaker)."""

    def __init__(
        self,
        engine: Any,
        policy: PolicyConfig,
        max_waiting: int | None,
        liveness: Callable[[], str | None],
    ):
        """liveness: why the engine is unhealthy, or None (Lifecycle.liveness_problem), for the breaker."""
        self.engine = engine
        self.policy = policy
        rate = policy.rate_limits
        self.requests = RequestLimiter(rate) if rate is not None else None
        self.tokens = TokenCounter(rate) if rate is not None else None
        self.window_s = rate.window_seconds if rate is not None else 0
        self.shedding = policy.shedding or (SheddingPolicy() if max_waiting is not None else None)
        self.max_waiting = max_waiting if max_waiting is not None else _policy_max_waiting(self.shedding)
        self.breaker = CircuitBreaker(policy.breaker, liveness) if policy.breaker is not None else None
        # The least urgent class's priority: shedding grades the classes between it and the protected ones.
        self.least_urgent = max((c.priority for c in policy.classes.values()), default=None)
        self.inflight = 0  # engine requests admitted and not yet ended
        self.queued: dict[int, Ticket] = {}  # id -> ticket admitted and waiting for its first outputs
        self.mean_latency_s = 0.0
        self.rejected: Counter | None = None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "shoal:requests_rejected",
            "Requests refused by a traffic policy, by reason.",
            ["reason"],
            registry=registry,
        )
        if self.breaker is not None:
            registry.register(_BreakerCollector(self.breaker))

    def _count(self, reason: str) -> None:
        if self.rejected is not None:
            self.rejected.labels(reason).inc()

    # ---- before the body: breaker and request rate --------------------------------------------------
    async def enter(self, ctx: RequestContext) -> tuple[Ticket | None, APIError | None]:
        ticket = Ticket(scopes_of(self.policy.rate_limits, ctx.identity) if self.requests else [])
        if self.requests is not None:
            decision = await self.requests.hit(ticket.scopes)
            if not decision.allowed:
                self._count("rate_limit_requests")
                return None, too_many("requests", decision, self.window_s)
            ticket.headers.update(ratelimit_headers("requests", decision.quota))
        refusal = self._shed_before_body(ctx)
        if refusal is not None:
            return None, refusal
        # After the rate limit: a half-open breaker's probe must be a request that reaches the engine.
        if self.breaker is not None:
            wait = self.breaker.allow()
            if wait is not None:
                self._count("circuit_open")
                return None, _unavailable(
                    f"the circuit breaker is open ({self.breaker.reason}); retry later",
                    "circuit_open",
                    wait,
                )
        return ticket, None

    def _shed_before_body(self, ctx: RequestContext) -> APIError | None:
        """With priority classes, the caller's class is the most urgent its request can be (a floor):
        if that is shed at this load and there is no less urgent request queued to evict, refuse now."""
        if self.shedding is None or not self.policy.classes:
            return None
        priority = self.policy.priority_of((ctx.identity or ANONYMOUS).priority_class)
        what, why = verdict(self.shedding, self.max_waiting, self.load(), priority, self.least_urgent)
        if what != "shed" or any(t.priority > priority for t in self.queued.values()):
            return None
        self._count("shed")
        return self._overloaded(why)

    def _overloaded(self, why: str) -> APIError:
        return _unavailable(
            f"the server is overloaded: {why}; retry later", "overloaded", self.shedding.retry_after_s
        )

    # ---- once tokenized: shedding, degradation, token rate ------------------------------------------
    async def admit_jobs(self, ticket: Ticket, jobs: list[Any]) -> None:
        """Shed, degrade or admit the request's engine requests; raise APIError (503/429) to refuse."""
        ticket.priority = min(job.priority for job in jobs)
        ticket.arrival = time.monotonic()
        if self.shedding is not None:
            self._shed_or_degrade(ticket, jobs)
        # Counted before the first await, so that a burst of arrivals sees each other (leave() uncounts).
        ticket.engine_requests = len(jobs)
        self.inflight += len(jobs)
        if self.tokens is not None:
            prompt = sum(len(job.prompt_ids) for job in jobs)
            decision = await self.tokens.admit(ticket.scopes, prompt)
            if not decision.allowed:
                self._count("rate_limit_tokens")
                raise too_many("tokens", decision, self.window_s)
            ticket.headers.update(ratelimit_headers("tokens", decision.quota))

    def load(self) -> Load:
        """Waiting requests: the engine's count, or (between its steps) what this server has sent beyond
        one batch; the estimated wait: the batches ahead times the mean request latency."""
        batch = max(int(getattr(self.engine.config, "max_num_seqs", 1)), 1)
        waiting = max(int(getattr(self.engine.stats, "num_waiting", 0)), self.inflight - batch)
        return Load(waiting, waiting / batch * self.mean_latency_s)

    def _shed_or_degrade(self, ticket: Ticket, jobs: list[Any]) -> None:
        priority = ticket.priority
        what, why = verdict(self.shedding, self.max_waiting, self.load(), priority, self.least_urgent)
        if what == "shed":
            self._count("shed")
            if self._evict_less_urgent_than(priority):
                return  # it takes the place of the one evicted
            raise self._overloaded(why)
        if what == "degrade":
            cap = self.shedding.degraded_max_tokens
            for job in jobs:
                job.params.max_tokens = min(job.params.max_tokens or cap, cap)
            ticket.headers[DEGRADED_HEADER] = f"max_tokens={cap}"

    def _evict_less_urgent_than(self, priority: int) -> bool:
        """Evict the least urgent queued request, newest first within a class (vLLM's preemption order),
        if it is less urgent than `priority`. O(queued), only when a request would be shed."""
        by_urgency = sorted(self.queued.values(), key=lambda t: (t.priority, t.arrival), reverse=True)
        for victim in by_urgency:
            if victim.priority <= priority:
                return False
            victim.evicted = True
            if victim.waiting is not None and victim.waiting.cancel():
                return True
            victim.evicted = False  # its first outputs came meanwhile: it is no longer waiting
        return False

    async def evictable(self, ticket: Ticket, first_outputs: Awaitable[T]) -> T:
        """Await a request's first outputs; if it is evicted meanwhile (its engine requests are then
        aborted as on a disconnect), raise APIError 503 `overloaded` with Retry-After."""
        task = asyncio.ensure_future(first_outputs)
        ticket.waiting = task
        self.queued[id(ticket)] = ticket
        try:
            return await task
        except asyncio.CancelledError:
            if not ticket.evicted:
                raise
            raise _unavailable(
                "the server is overloaded: this request was shed for more urgent ones; retry later",
                "overloaded",
                self.shedding.retry_after_s if self.shedding is not None else 1,
            ) from None
        finally:
            self.queued.pop(id(ticket), None)
            ticket.waiting = None

    # ---- after the response -------------------------------------------------------------------------
    async def leave(self, ticket: Ticket, ctx: RequestContext) -> None:
        """The request has been answered in full (ctx.status set, ctx.outputs final)."""
        self.inflight -= ticket.engine_requests
        if ticket.engine_requests and ctx.status == 200:
            latency = time.monotonic() - ctx.arrival_time
            self.mean_latency_s += LATENCY_EWMA_ALPHA * (latency - self.mean_latency_s)
        if self.breaker is not None:
            if not ticket.engine_requests:  # refused before the engine: says nothing of its health
                self.breaker.abstain()
            elif ctx.status is None or (ctx.status >= 500 and ctx.status != 503):
                self.breaker.failed()
            else:
                self.breaker.succeeded(timed_out=ctx.timed_out)
        if self.tokens is not None and ticket.engine_requests:
            completion = sum(len(o.token_ids) for out in ctx.outputs for o in out.outputs)
            await self.tokens.record(ticket.scopes, completion)

    async def close(self) -> None:
        for part in (self.requests, self.tokens):
            if part is not None:
                await part.close()


def _policy_max_waiting(shedding: SheddingPolicy | None) -> int | None:
    return shedding.max_waiting_requests if shedding is not None else None


def _unavailable(message: str, code: str, retry_after_s: float) -> APIError:
    return APIError(
        message,
        503,
        type=SERVER_ERROR,
        code=code,
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


class _BreakerCollector:
    def __init__(self, breaker: CircuitBreaker):
        self.breaker = breaker

    def describe(self):  # declared, so /metrics?name[]= can select it (DeclaredCollector's reason)
        return [self._family()]

    def collect(self):
        family = self._family()
        family.add_metric([], int(self.breaker.state))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "shoal:circuit_breaker_state", "The engine's circuit breaker: 0 closed, 1 open, 2 half-open."
        )


def ticket_of(request: Request) -> Ticket | None:
    return request.scope.get("state", {}).get("traffic")


def evictable(request: Request, first_outputs: Awaitable[T]) -> Awaitable[T]:
    """first_outputs, evictable by more urgent arrivals when shedding is on (TrafficGuard.evictable)."""
    guard, ticket = request.app.state.shoal.traffic, ticket_of(request)
    if guard is None or guard.shedding is None or ticket is None:
        return first_outputs
    return guard.evictable(ticket, first_outputs)


class TrafficMiddleware:
    """Breaker and request-rate checks before the body; headers, usage and outcome after the answer."""

    def __init__(self, app: ASGIApp, guard: TrafficGuard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        ctx = scope.get("state", {}).get("ctx") or request_context(Request(scope))
        ticket, refusal = await self.guard.enter(ctx)
        if refusal is not None:
            response = error_response(
                refusal.status_code, refusal.message, refusal.type, code=refusal.code, headers=refusal.headers
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["traffic"] = ticket

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                extra = [(k.encode(), v.encode()) for k, v in ticket.headers.items()]
                message["headers"] = headers + [h for h in extra if h[0] not in present]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            # The answer is complete (streams included): its status and outputs are final.
            try:
                await self.guard.leave(ticket, ctx)
            except Exception:  # noqa: BLE001 - accounting must not fail an answered request
                logger.exception("traffic accounting failed")
