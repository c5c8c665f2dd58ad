"""LLMRouter: the public calls, and the one request loop that serves them.

    _request   the call checked (options.py), its chain of models (routing.py,
               fallback.py: aliases, fallbacks=, context windows), its deadline
    _serve     the loop, by the policy of retry.py (when to stop, how long to
               wait), within the deadline (deadline.py); each round is _step:
    _step      the model and backend for this try (selection.py, strategies.py)
               -> a Try (lifecycle.py): admitted by the backend's limits
               (limits.py) and budgets (budgets.py), sent through LiteLLM,
               priced (pricing.py), settled, recorded (usage.py), released
               -> on failure, _failed: what it means (retry.classify), the
               backend cools down or is dropped, the loop goes round again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from . import _litellm
from .backends import ResolvedBackend
from .budgets import BudgetMethods, Budgets
from .cache.serve import Plan, ResponseCache
from .config import RouterConfig
from .deadline import Deadline
from .errors import BadRequestError, Saturated, TryTimedOut
from .fallback import build_chain, none_fits, too_small
from .guards import GuardMethods, Guards, make_guards
from .health import Health
from .lifecycle import OpenStream, Services, Try
from .options import CallOptions, checked
from .pricing import Pricing
from .redact import short
from .request import Call, Request
from .response import LLMResponse
from .retry import Action, TryAgain, TryFailed, classify, cooldown, outcome, retrying
from .routing import Routes
from .selection import pick
from .state import BackendGate, State
from .stores import make_breakers, make_state, open_store
from .strategies import STRATEGIES, Strategy
from .streaming import LLMStream
from .telemetry import make_telemetry
from .usage import Listener, UsageLedger, UsageMethods

log = logging.getLogger("xml_pipeline_llm")


class LLMRouter(UsageMethods, BudgetMethods, GuardMethods):
    """Routes ``complete()`` and ``stream()`` calls over the configured backends.

    ``state`` replaces the shared state the config names (``MemoryState`` or
    Redis); ``clock`` (UNIX seconds) is what budget windows are reckoned by.
    """

    def __init__(self, config: RouterConfig, state: State | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.backends = config.backends
        self._strategy: Strategy = config.strategy_object or STRATEGIES[config.strategy]()
        self._state: State = state if state is not None else make_state(config)
        self._gates: dict[str, BackendGate] = {
            b.name: self._state.gate(b.name, b.max_concurrent, b.rate_limit_tpm, b.rate_limit_rpm)
            for b in self.backends}
        #: what calls cost (``pricing.py``): this router's prices, for what budgets reserve and what is charged
        self.pricing = Pricing(config.pricing)
        store = open_store(config.usage_store, config.redis_prefix)
        self._ledger = UsageLedger(store, shared=self._state.usage,
                                   group_by_metadata=config.telemetry.group_by_metadata)
        self._budgets: Budgets = self._state.budgets(config.budgets, clock, getattr(store, "spend", None))
        self._routes = Routes(self.backends, config.skipped)
        #: loops, call caps per thread, the kill switch, degrade (``guards.py``)
        self._guards: Guards = make_guards(config, self._state, self._ledger, self._budgets)
        self._llm: _litellm.Deployments | None = None
        self._secrets = [b.api_key.get_secret_value() for b in self.backends if b.api_key is not None]
        self.id = uuid.uuid4().hex
        #: spans and metrics (``telemetry.py``): ``NOOP`` when off or not installed; ``.metrics_url``
        self.telemetry = make_telemetry(config, self, self._ledger, self._secrets)
        #: the response cache (``llm.cache``, ``cache/``); None when off
        self.cache = None if config.cache is None else ResponseCache(
            config.cache, self._ledger, conn=getattr(self._state, "conn", None), prefix=config.redis_prefix,
            providers={b.name: b.provider.name for b in self.backends})
        #: provider-reported quotas, circuit breakers, latencies (``health.py``)
        self.health = Health(self._gates, make_breakers(config, self._state), self._strategy)
        self._services = Services(self.id, {b.name: b for b in self.backends}, self._gates, self._ledger,
                                  self._deployments, config.default_max_tokens, self._budgets,
                                  config.weights, self.telemetry, config.stream_idle_timeout,
                                  pricing=self.pricing, health=self.health)

    def __repr__(self) -> str:
        return f"LLMRouter(strategy={self.config.strategy!r}, backends=[{', '.join(b.name for b in self.backends)}])"

    def route(self, model: str) -> tuple[str, list[ResolvedBackend]]:
        """The model name to send and the backends that may serve it (file order; ``routing.py``)."""
        return self._routes.route(model)

    @property
    def state(self) -> State:
        """Where limits, cooldowns and rotation are kept: ``MemoryState``, or ``RedisState`` with
        ``shared_state`` (``shared/state.py``); the object passed as ``state=``, if one was."""
        return self._state

    def gate(self, backend: str) -> BackendGate:
        """The limits of one backend (``in_flight``, ``queued``, ``load``)."""
        return self._gates[backend]

    async def cooldowns(self) -> dict[str, float]:
        """Seconds left for each backend cooling down now (shared ones with Redis state)."""
        return await self._state.cooldowns(b.name for b in self.backends)

    def circuit(self, backend: str) -> str:
        """The circuit breaker of ``backend``: ``"closed"``, ``"open"`` or ``"half_open"`` (``circuit.py``)."""
        return self.health.circuit(backend)

    async def _cooling(self, backends: Iterable[str]) -> dict[str, float]:
        """Backends out of rotation now: cooling down, or their circuit open."""
        names = list(backends)
        return await self.health.cooldowns(await self._state.cooldowns(names), names)

    async def shared_state_problem(self) -> str | None:
        """None when shared state answers a PING (or there is none), else why not (readiness probes)."""
        conn = getattr(self._state, "conn", None)
        if conn is None:
            return None
        try:
            await conn.commands(("PING",))
        except Exception as exc:
            return f"shared state (Redis) does not answer: {type(exc).__name__}"
        return None

    # ------------------------------------------------------------ calls

    async def complete(self, model: str, messages: list[dict[str, Any]], *,
                       agent_id: str | None = None, thread_id: str | None = None,
                       metadata: dict[str, Any] | None = None, **kwargs: Any) -> LLMResponse:
        """One chat completion, retried and failed over by the configured rules."""
        options, kwargs, metadata = checked(model, messages, agent_id, thread_id, metadata, kwargs, streaming=False)
        plan = self.cache and self.cache.plan(model, messages, kwargs, agent_id, thread_id, metadata, options)
        if plan:        # the response cache: a hit, or this call through it (cache/); the guards first
            admitted = self._guarded(plan, model, messages, kwargs, agent_id, thread_id, metadata)
            return await plan.complete(lambda: self._complete(model, messages, agent_id, thread_id, metadata,
                                                              kwargs, options, admitted[0]))
        return await self._complete(model, messages, agent_id, thread_id, metadata, kwargs, options)

    def _guarded(self, plan: Plan, model: str, messages: list[dict[str, Any]], kwargs: dict[str, Any],
                 agent_id: str | None, thread_id: str | None, metadata: dict[str, Any]) -> list[str]:
        """Have the guards check a call through the cache before the cache answers it (a hit is a
        request too: a blocked agent, a loop or a spent call cap is refused); the model they send
        it to, once they passed it, in the list returned."""
        admitted: list[str] = []

        async def check() -> None:
            sent, pending = await self._guards.admit(model, messages, kwargs, agent_id, thread_id, metadata)
            await self._guards.passed(pending)
            admitted.append(sent)

        plan.before = check
        return admitted

    async def _complete(self, model: str, messages: list[dict[str, Any]], agent_id: str | None,
                        thread_id: str | None, metadata: dict[str, Any], kwargs: dict[str, Any],
                        options: CallOptions, admitted: str | None = None) -> LLMResponse:
        req = await self._request(model, messages, agent_id, thread_id, metadata, kwargs, options, admitted)
        resp = await self._serve(req, stream=False)
        assert isinstance(resp, LLMResponse)
        resp.attempts = len(req.attempts) + 1
        return resp

    def stream(self, model: str, messages: list[dict[str, Any]], *,
               agent_id: str | None = None, thread_id: str | None = None,
               metadata: dict[str, Any] | None = None, **kwargs: Any) -> LLMStream:
        """An async iterator of text deltas; ``.response`` holds the LLMResponse once it ends."""
        options, kwargs, metadata = checked(model, messages, agent_id, thread_id, metadata, kwargs, streaming=True)

        admitted: list[str] = []

        async def open_stream() -> OpenStream:
            req = await self._request(model, messages, agent_id, thread_id, metadata, kwargs, options,
                                      admitted[0] if admitted else None)
            opened = await self._serve(req, stream=True)
            assert isinstance(opened, OpenStream)
            return opened

        plan = self.cache and self.cache.plan(model, messages, kwargs, agent_id, thread_id, metadata, options)
        if plan:        # the response cache: a hit replayed, or this stream through it (cache/); the guards first
            admitted = self._guarded(plan, model, messages, kwargs, agent_id, thread_id, metadata)
            return plan.stream(lambda: LLMStream(open_stream))
        return LLMStream(open_stream)

    async def _request(self, model: str, messages: list[dict[str, Any]], agent_id: str | None,
                       thread_id: str | None, metadata: dict[str, Any] | None,
                       kwargs: dict[str, Any], options: CallOptions, admitted: str | None = None) -> Request:
        """The request for a checked call (``admitted``: the model the guards already passed it for)."""
        guard = None
        if admitted is None:
            model, guard = await self._guards.admit(model, messages, kwargs, agent_id, thread_id, metadata or {})
        else:
            model = admitted
        chain = build_chain(self._routes, self.config.models, model, options.fallbacks)
        retries = self.config.retries if options.retries is None else options.retries
        call = Call(model, messages, kwargs, agent_id, thread_id, dict(metadata or {}), options)
        req = Request(call, chain, retries + 1, Deadline(options.deadline or self.config.deadline),
                      self.config.max_queue_wait, guard=guard)
        for place, why in too_small(req):
            req.skip(why, place)
        live = req.live()
        if not live:
            raise none_fits(req)
        req.use(live[0][0])
        if self._strategy.rotates:
            req.turn = await self._state.next_turn(req.model)
        return req

    async def _serve(self, req: Request, stream: bool) -> LLMResponse | OpenStream:
        """The request loop: rounds of ``_step`` by the policy in ``retry.py``, within the deadline."""
        served: LLMResponse | OpenStream | None = None
        with self.telemetry.request(req, stream):      # the request's span (a stream's ends with it)
            try:
                async with req.deadline.bound() as bound:
                    async for attempt in retrying(req, self._cooling, self.telemetry.waiting):
                        with attempt:
                            served = await self._step(req, stream)
            except TryAgain:
                raise req.final_error() from req.last_exc
            except TimeoutError:
                if not bound.expired():
                    raise
                raise req.deadline.error(req.name, req.attempts) from req.last_exc
        assert served is not None
        return served

    async def _step(self, req: Request, stream: bool) -> LLMResponse | OpenStream:
        """One round: pick the model and backend, try it; a failure raises ``TryAgain`` (or the
        request's own error), and the loop goes round again."""
        cooling = await self._cooling(b.name for b in req.remaining())
        chosen = pick(req, cooling, self._strategy, self._gates)
        if chosen is None:
            raise TryAgain()        # every backend left cools down: the policy waits for the first
        place, backend = chosen
        if not await self.health.admit(backend.name):
            raise TryAgain()        # its circuit is half open and another call has the probe
        if place != req.step:
            log.info("%s: moving on to model %s", req.name, req.chain[place].model)
            req.use(place)
        try:
            async with Try(self._services, req, backend) as t:
                await self._guards.passed(req.guard)    # guards/: checks sent alongside the admission, before sending
                try:
                    return await (t.open_stream() if stream else t.complete())
                except Exception as exc:
                    if not (t.sent() or isinstance(exc, TryTimedOut)):
                        self._not_sent(req, backend, exc)
                    await self._failed(req, t, exc)
        except Saturated as exc:     # llm.max_queue_wait: on to the next model that can start
            req.skip(f"saturated: {exc}")
            log.info("%s: %s skipped for this request: %s", req.name, req.model, exc)
            raise TryAgain() from None

    def _not_sent(self, req: Request, backend: ResolvedBackend, exc: Exception) -> NoReturn:
        """LiteLLM failed before sending: no cooldown, no try.  A parameter the backend's provider
        does not take drops that backend for this request; anything else is the request's own fault."""
        verdict = classify(exc, _litellm.cause(exc))
        if verdict is None or verdict.action is not Action.UNSUPPORTED:
            raise BadRequestError(
                f"{req.model}: LiteLLM could not build the request for {backend.name} "
                f"({backend.provider.name}), so nothing was sent: {self._short(exc)}; check the "
                f"messages and parameters", req.attempts) from exc
        req.drop(backend, _litellm.unsupported_params(exc))
        log.info("%s: %s (%s) does not take %s; nothing sent, trying the next backend", req.model,
                 backend.name, backend.provider.name, req.unsupported[backend.name])
        raise TryAgain() from exc

    async def _failed(self, req: Request, t: Try, exc: Exception) -> NoReturn:
        """Classify a failed try, cool the backend down or drop it, record it, then raise."""
        verdict = classify(exc, _litellm.cause(exc))
        if verdict is None:
            await t.record_failure("error:internal")
            raise exc
        backend, detail = t.backend, self._short(exc)
        self.health.ended(backend.name, req.model, verdict.kind)
        req.note(backend, verdict, exc, detail)
        if verdict.kind == "context_window" and len(req.chain) > 1 and req.skip(
                f"{backend.name} said the prompt exceeds its context window ({verdict.status}: {detail})"):
            pass      # the next model may take it: a try like any other
        elif verdict.action is Action.FATAL:
            await t.record_failure(outcome(True, verdict))
            raise BadRequestError(f"{req.name}: {backend.name} rejected the request ({verdict.status}): "
                                  f"{detail}{req.skipped_models()}", req.attempts, verdict.status or 400) from exc
        wait = None
        if verdict.action is Action.RETRY:
            wait = cooldown(verdict, len(req.attempts) - 1, self.config.retry_base_delay,
                            self.config.retry_max_delay)
            await self._state.cool_down(backend.name, wait)
        final = req.exhausted()
        await t.record_failure(outcome(final, verdict), wait)
        log.info("%s: try %d/%d on %s failed (%s %s)%s; %s", req.model, len(req.attempts), req.tries,
                 backend.name, verdict.kind, verdict.status or "",
                 f", cooling down {wait:.2f}s" if wait is not None else ", model skipped for this request"
                 if verdict.kind == "context_window" else ", dropped for this request",
                 "giving up" if final else "trying again")
        raise TryFailed()

    def _short(self, exc: BaseException) -> str:
        """Provider error text with any configured key masked (some providers echo a bad key)."""
        return short(exc, self._secrets)

    def _deployments(self) -> _litellm.Deployments:
        if self._llm is None:
            self._llm = _litellm.Deployments(self.backends)
            _litellm.register(self.id, self._services)
        return self._llm

    def warm_up(self) -> None:
        """Import LiteLLM and build the deployments now rather than at the first call (seconds):
        before forking workers, or before a timed section."""
        self._deployments()

    def litellm_router(self) -> Any:
        """A ``litellm.Router`` over the same backends (``"<backend>/<model>"``), its own rules off;
        ``complete()`` does not use it (``_litellm.Deployments``) and calls through it are not accounted."""
        return _litellm.build_router(self.backends, self.config.timeout)

    def on_usage(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event)`` for every usage event once it is in the totals; returns unsubscribe."""
        return self._ledger.listeners.add(callback)

    async def aclose(self) -> None:
        """Flush and close the usage store and the shared-state connection."""
        self.telemetry.close()
        await self._guards.close()
        if self.cache is not None:
            await self.cache.close()
        await self._ledger.close()
        await self._state.close()

    def close(self) -> None:
        """``aclose`` for code outside an event loop (``configure_router`` replacing a router)."""
        self.telemetry.close()
        self._ledger.flush()
