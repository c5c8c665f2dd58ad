"""One provider try, from admission to release: the seam every call goes through.

    async with Try(services, req, backend) as t:   # admitted: a slot and its tokens are held
        response = await t.complete()              # sent, settled, recorded, released

A stream holds its try past the ``async with``: ``t.open_stream()`` returns
once the first content arrived, and the stream calls ``t.finish(...)`` when it
ends (read to the end, closed early or dropped).  On an error the try is
released by ``__aexit__`` with nothing charged; the router classifies the
error (``retry.py``) and records it with ``t.record_failure(outcome)``.

``complete()`` and ``stream()`` use it alike, so limits, budgets, accounting
and telemetry hook in here once, not per call path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from . import _litellm
from .budgets import BudgetKey, Budgets, Hold, keys_for
from .errors import Attempt, BackendError, ProviderError, Saturated, TryTimedOut
from .fairness import ANONYMOUS, Turn
from .health import Health
from .pricing import Pricing
from .reservation import fair_cost, tokens_to_reserve, worst_case, worst_cost
from .response import LLMResponse
from .streaming import close_quietly, first_chunks
from .telemetry import NOOP, NoTelemetry
from .usage import OK, UsageEvent, UsageLedger, make_event

if TYPE_CHECKING:
    from .backends import ResolvedBackend
    from .limits import Reservation
    from .request import Request
    from .state import BackendGate

T = TypeVar("T")


@dataclass(eq=False)
class Services:
    """What every try of one router uses; built once by the router."""

    router_id: str
    backends: Mapping[str, ResolvedBackend]
    gates: Mapping[str, BackendGate]
    ledger: UsageLedger
    deployments: Callable[[], _litellm.Deployments]
    default_max_tokens: int
    budgets: Budgets
    weights: Mapping[str, float]
    telemetry: NoTelemetry = NOOP      # spans and metrics (telemetry.py); NOOP when off or not installed
    idle_timeout: float | None = None  # llm.stream_idle_timeout (None: the try's timeout)
    pricing: Pricing = field(default_factory=Pricing)    # what calls cost (pricing.py)
    health: Health = field(default_factory=lambda: Health({}))   # quotas, breakers, latency (health.py)

    def record_from_callback(self, meta: Mapping[str, Any], kwargs: Mapping[str, Any], response: Any,
                             start: Any, end: Any) -> None:
        """LiteLLM's success callback: count the call unless the try already did (same call id)."""
        backend = self.backends.get(meta.get("xpl_backend") or "")
        if backend is None:
            return
        try:
            latency = (end - start).total_seconds() * 1000
        except (TypeError, AttributeError):
            latency = 0.0
        call_id = str(kwargs.get("litellm_call_id") or "")
        if self.ledger.counted(call_id):   # the try recorded it already: no need to price it again
            return
        model = meta.get("xpl_model") or ""
        self.ledger.record_nowait(make_event(
            agent_id=meta.get("agent_id"), thread_id=meta.get("thread_id"), model=model,
            backend=backend.name, provider=backend.provider.name, usage=_litellm.usage_of(response),
            cost_usd=self.pricing.cost(model, backend.provider.litellm_prefix, getattr(response, "usage", None)),
            latency_ms=latency, outcome=OK, call_id=call_id,
            requested_model=meta.get("xpl_requested") or model,
            metadata=meta.get("xpl_metadata")))


@dataclass
class OpenStream:
    """A stream whose first content arrived: its try (still held), LiteLLM's wrapper, what was read."""

    try_: Try
    wrapper: Any
    first: list[Any]
    ended: bool


class Try:
    """One provider call: admit (slot + tokens), send, settle, record, release."""

    def __init__(self, services: Services, req: Request, backend: ResolvedBackend) -> None:
        self.services = services
        self.req = req
        self.backend = backend
        self.gate = services.gates[backend.name]
        self.tag = _litellm.new_try()
        self.reservation: Reservation | None = None
        self.hold: Hold | None = None
        self.start = 0.0
        self.timeout = req.options.timeout or backend.timeout      # seconds for this try, our clock
        self.waited = 0.0               # a stream's time spent waiting for the provider so far
        self.span: Any = None           # this try's telemetry span while it runs
        self._held = False
        self._released = False

    async def __aenter__(self) -> Try:
        req = self.req
        tokens = tokens_to_reserve(req, self.backend, self.services.default_max_tokens, self.gate.paced)
        agent = req.agent_id or ANONYMOUS
        turn = Turn(agent, self.services.weights.get(agent, 1.0),
                    fair_cost(req, tokens, self.services.default_max_tokens), req.options.priority)
        budgets = self.services.budgets
        keys = keys_for(req.agent_id, req.thread_id, req.metadata, budgets.scopes) if budgets.scopes else []
        if req.deadline.at is not None:     # a wait for the limits that cannot end in time: refused now
            req.deadline.refuse_if(self.gate.min_wait(tokens), f"{self.backend.name}'s limits (slots, tokens, "
                                   f"requests per minute)", req.name, req.attempts)
        queue_wait = req.queue_wait if req.queue_wait is not None and req.has_next_model() else None
        if queue_wait is None:
            await self._admit(budgets, keys, tokens, turn)
        else:
            try:
                async with asyncio.timeout(queue_wait) as bound:
                    await self._admit(budgets, keys, tokens, turn)
            except TimeoutError:
                if not bound.expired():
                    raise
                raise Saturated(f"{self.backend.name} could not take it within llm.max_queue_wait "
                                f"({queue_wait:g}s)") from None
        if req.deadline.at is not None:
            req.deadline.waiting_for = f"the answer from {self.backend.name}"
        self.start = time.perf_counter()
        self.services.telemetry.try_started(self)
        return self

    async def _admit(self, budgets: Budgets, keys: list[BudgetKey], tokens: int, turn: Turn) -> None:
        if keys:
            await self._admit_within_budgets(budgets, keys, tokens, turn)
        else:
            self.reservation = await self.gate.enter(tokens, turn)

    async def _admit_within_budgets(self, budgets: Budgets, keys: list[BudgetKey], tokens: int,
                                    turn: Turn) -> None:
        """Reserve the worst case in the budgets while asking the gate (with Redis: one round trip).

        A call over budget still fails at once: its admission is called off, and a
        slot it was given meanwhile goes back.  A failed admission gives the budgets back.
        """
        req, default = self.req, self.services.default_max_tokens
        usd = worst_cost(req, self.backend, default, self.services.pricing) if budgets.usd else 0.0
        reserving = asyncio.ensure_future(budgets.reserve(keys, sum(worst_case(req, default)), usd, req.model))
        entering = asyncio.ensure_future(self.gate.enter(tokens, turn))
        try:
            self.hold = await reserving
            self.reservation = await entering
        except BaseException:
            _call_off(entering, lambda got: self.gate.leave(got, 0))
            if self.hold is None:
                _call_off(reserving, lambda got: None if got is None else budgets.settle(got, 0, 0.0))
            self._settle_budgets(0, 0.0)
            raise

    def _settle_budgets(self, tokens: int, usd: float | None) -> None:
        hold, self.hold = self.hold, None
        if hold is not None:
            self.services.budgets.settle(hold, tokens, usd)

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._held:
            if isinstance(exc_info[1], asyncio.CancelledError) and self.reservation is not None \
                    and not self._released and self.sent():
                # cut while the provider had it (the deadline, or the caller went away): an event, no tokens
                outcome = "error:deadline" if self.req.deadline.expired() else "cancelled"
                self.services.ledger.record_nowait(self.event(None, None, self.latency_ms, outcome))
            self.release(0)
            if self.span is not None:     # ended without an event: not sent (or cancelled)
                exc = exc_info[1]
                self.services.telemetry.try_exited(self, exc if isinstance(exc, BaseException) else None)

    @property
    def seq(self) -> int:
        """This call's number at its backend's gate (what the provider's quota readings are matched to)."""
        return self.reservation.seq if self.reservation is not None else 0

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000

    def sent(self) -> bool:
        """Whether LiteLLM got as far as sending this try (an error before that is not the provider's)."""
        return _litellm.sent(self.tag)

    async def complete(self) -> LLMResponse:
        """Send the request; settle, record and release; the answer.  ``timeout`` bounds it by our clock."""
        try:
            async with asyncio.timeout(self.timeout) as bound:
                raw = await self._send({})
        except TimeoutError:
            if not bound.expired():
                raise
            raise TryTimedOut(f"no answer within the {self.timeout:g}s timeout") from None
        req, backend = self.req, self.backend
        cost = self.services.pricing.cost(req.model, backend.provider.litellm_prefix,
                                          getattr(raw, "usage", None))
        self.release(_litellm.usage_of(raw)["total_tokens"], cost)
        latency = self.latency_ms
        self.services.health.ended(backend.name, req.model, None, latency / 1000)
        resp = _litellm.to_response(raw, backend.name, latency, cost)
        event = self.event(resp.usage, cost, latency, OK, _litellm.call_id(raw))
        await self.services.ledger.record(event)
        self.services.telemetry.try_ended(self, event, resp)
        return resp

    async def open_stream(self) -> OpenStream:
        """Send a streaming request and read up to its first content; the try stays held."""
        options = {**self.req.kwargs.get("stream_options", {}), "include_usage": True}
        opened = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout) as bound:
                wrapper = await self._first_byte({"stream": True, "stream_options": options})
                _litellm.tap(wrapper)         # the stream's end is read by the router (see _litellm.streams)
                try:
                    first, ended = await first_chunks(wrapper, self.idle_timeout)
                except BaseException:
                    await close_quietly(wrapper)
                    raise
        except TimeoutError:
            if not bound.expired():
                raise
            raise TryTimedOut(f"no content within the {self.timeout:g}s timeout") from None
        self.waited = time.monotonic() - opened
        self.services.health.ended(self.backend.name, self.req.model, None, self.waited)   # to the first token
        self._held = True
        return OpenStream(self, wrapper, first, ended)

    async def _first_byte(self, extra: dict[str, Any]) -> Any:
        """Send a streaming request: its answer must begin within the idle timeout too."""
        try:
            async with asyncio.timeout(self.idle_timeout) as idle:
                return await self._send(extra)
        except TimeoutError:
            if not idle.expired():
                raise
            raise TryTimedOut(f"no answer for {self.idle_timeout:g}s (stream_idle_timeout)") from None

    @property
    def idle_timeout(self) -> float:
        """Seconds a stream may go without a chunk: per call, else ``llm.stream_idle_timeout``, else ``timeout``."""
        return self.req.options.stream_idle_timeout or self.services.idle_timeout or self.timeout

    def next_chunk_by(self) -> tuple[float, str]:
        """When (``time.monotonic()``) the next chunk of a held stream must have come, and which bound that is.

        The try's ``timeout`` counts the time spent waiting for the provider, not
        the caller's own time between reads; the request's deadline is wall time.
        """
        now = time.monotonic()
        bound = min((now + self.idle_timeout, "idle"), (now + max(0.0, self.timeout - self.waited), "timeout"))
        at = self.req.deadline.at
        return min(bound, (at, "deadline")) if at is not None else bound

    def cut_error(self, why: str) -> BackendError:
        """The error a caller gets for a stream cut after it handed out text (the stream is charged what came)."""
        req, name = self.req, self.backend.name
        if why == "deadline":
            req.deadline.waiting_for = f"the stream from {name}"
            return req.deadline.error(req.name, req.attempts)
        what = (f"no chunk for {self.idle_timeout:g}s (stream_idle_timeout)" if why == "idle" else
                f"it ran past its {self.timeout:g}s timeout")
        attempt = Attempt(name, "timeout", None, what)
        return ProviderError(f"{req.model}: the stream from {name} was cut: {what}; the text so far was "
                             f"handed out and is charged. Retry the call, or raise the timeout",
                             [*req.attempts, attempt])

    async def _send(self, extra: dict[str, Any]) -> Any:
        req, backend = self.req, self.backend
        meta = {**req.metadata, "xpl_router": self.services.router_id, "xpl_backend": backend.name,
                "xpl_try": self.tag, "agent_id": req.agent_id, "thread_id": req.thread_id,
                "xpl_model": req.model, "xpl_requested": req.requested_model or req.model,
                "xpl_metadata": req.metadata}
        kwargs = {**req.kwargs, **extra} if extra else req.kwargs
        with self.services.telemetry.sending(self):
            try:
                answer = await self.services.deployments().acompletion(
                    backend.name, req.model, messages=req.messages, metadata=meta, timeout=req.options.timeout,
                    drop_params=req.options.drop_params, **kwargs)
            except Exception as exc:
                self.services.health.answered(backend.name, exc, self.seq)     # a 429 says what is left too
                raise
            self.services.health.answered(backend.name, answer, self.seq)  # pace by the quota it reports
            return answer

    def release(self, used: int, cost_usd: float | None = 0.0) -> None:
        """Free the slot; settle the limits and budgets against ``used`` tokens and ``cost_usd`` (once)."""
        if self._released:
            return
        self._released = True
        _litellm.forget(self.tag)
        assert self.reservation is not None
        self.gate.leave(self.reservation, used)
        self._settle_budgets(used, cost_usd)

    def event(self, usage: Mapping[str, int] | None, cost_usd: float | None, latency_ms: float,
              outcome: str, call_id: str = "") -> UsageEvent:
        req = self.req
        return make_event(agent_id=req.agent_id, thread_id=req.thread_id, model=req.model,
                          backend=self.backend.name, provider=self.backend.provider.name, usage=usage,
                          cost_usd=cost_usd, latency_ms=latency_ms, outcome=outcome, call_id=call_id,
                          requested_model=req.requested_model or req.model, metadata=req.metadata)

    async def record_failure(self, outcome: str, cooldown: float | None = None) -> None:
        """Record a failed try (``cooldown``: seconds its backend now cools down, for telemetry)."""
        event = self.event(None, None, self.latency_ms, outcome)
        await self.services.ledger.record(event)
        self.services.telemetry.try_ended(self, event, None, cooldown)

    def finish(self, resp: LLMResponse, outcome: str, call_id: str) -> UsageEvent:
        """A held stream ended: release and settle with its usage; the event to record."""
        self.release(resp.usage["total_tokens"], resp.cost_usd)
        event = self.event(resp.usage, resp.cost_usd, resp.latency_ms, outcome, call_id)
        self.services.telemetry.try_ended(self, event, resp)
        return event


def _call_off(fut: asyncio.Future[T], give_back: Callable[[T], None]) -> None:
    """Cancel what ``fut`` is getting; what it got all the same goes back through ``give_back``."""
    def after(done: asyncio.Future[T]) -> None:
        if not done.cancelled() and done.exception() is None:
            give_back(done.result())

    fut.add_done_callback(after)
    fut.cancel()
