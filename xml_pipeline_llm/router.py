"""LLMRouter: find the backends serving a model, pick one per try, retry by the rules.

A request goes: candidates (C3) -> strategy picks a ready backend (C4) ->
the backend's gate admits it (C6) -> LiteLLM makes the call -> on failure the
error is classified, the backend cools down and the next try goes elsewhere
(C5) -> every call is recorded in the usage ledger (C7).

LiteLLM does the provider HTTP work (``litellm.acompletion`` on the chosen
backend's deployment, see ``_litellm.Deployments``); its own retries are off,
so the rules here are the only ones in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from . import _litellm
from .config import ResolvedBackend, RouterConfig
from .providers import lookup
from .errors import (Attempt, BackendError, BadRequestError, ModelNotFoundError, NoBackendError,
                     ProviderError, RateLimitError)
from .options import CallOptions, check_call, split_options
from .response import LLMResponse
from .retry import Action, Verdict, classify, cooldown
from .strategies import STRATEGIES
from .usage import AgentUsage, UsageEvent, UsageLedger, write_csv
from .stores import open_store
from .streaming import LLMStream, first_chunks

log = logging.getLogger("xml_pipeline_llm")


class _TryFailed(Exception):
    """A try failed in a way the next try may fix (internal to the retry loop)."""


@dataclass
class Request:
    """One caller request and what its tries have learnt so far."""

    model: str
    messages: list[dict[str, Any]]
    kwargs: dict[str, Any]
    agent_id: str | None
    thread_id: str | None
    metadata: dict[str, Any]
    candidates: list[ResolvedBackend]
    options: CallOptions
    tries: int                        # at most this many provider calls
    turn: int = 0
    estimate: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    unsupported: dict[str, str] = field(default_factory=dict)   # backend -> what its provider refused
    last_exc: BaseException | None = None


class LLMRouter:
    """Routes ``complete()`` and ``stream()`` calls over the configured backends."""

    def __init__(self, config: RouterConfig, state: Any = None) -> None:
        self.config = config
        self.backends = config.backends
        self._strategy = STRATEGIES[config.strategy]()
        from .state import make_state

        self._state = state if state is not None else make_state(config)
        self._gates = {b.name: self._state.gate(b.name, b.max_concurrent, b.rate_limit_tpm)
                       for b in self.backends}
        self._ledger = UsageLedger(open_store(config.usage_store, config.redis_prefix),
                                   shared=getattr(self._state, "usage", None))
        self._routes: dict[str, tuple[str, list[ResolvedBackend]]] = {}
        self._llm: _litellm.Deployments | None = None
        self.id = uuid.uuid4().hex

    def __repr__(self) -> str:
        names = ", ".join(b.name for b in self.backends)
        return f"LLMRouter(strategy={self.config.strategy!r}, backends=[{names}])"

    # ------------------------------------------------------------ routing

    def route(self, model: str) -> tuple[str, list[ResolvedBackend]]:
        """The model name to send and the backends that may serve it (file order)."""
        found = self._routes.get(model)
        if found is None:
            found = self._routes[model] = self._route(model)
        return found

    def _route(self, model: str) -> tuple[str, list[ResolvedBackend]]:
        pool, bare = self.backends, model
        prefix, sep, rest = model.partition("/")
        if sep and rest and (lookup(prefix) is not None or any(b.name == prefix for b in self.backends)):
            # a provider (or backend) prefix restricts the candidates, even to none
            pool, bare = [b for b in self.backends if prefix in (b.provider.name, b.name)], rest
        ruled = [b for b in pool if not b.catch_all and _serves(b, bare)]
        chosen = ruled or [b for b in pool if b.catch_all]
        if not chosen:
            served = "; ".join(f"{b.name} ({b.provider.name}): {b.describe_models()}" for b in self.backends)
            raise ModelNotFoundError(
                f'no backend serves model "{model}". Configured: {served}. '
                f"Fix the model name, or add it to a backend's supported_models")
        return bare, chosen

    def gate(self, backend: str) -> Any:
        return self._gates[backend]

    async def cooldowns(self) -> dict[str, float]:
        """Seconds left for each backend cooling down now (shared ones with Redis state)."""
        return await self._state.cooldowns(b.name for b in self.backends)

    # ------------------------------------------------------------ calls

    async def complete(self, model: str, messages: list[dict[str, Any]], *,
                       agent_id: str | None = None, thread_id: str | None = None,
                       metadata: dict[str, Any] | None = None, **kwargs: Any) -> LLMResponse:
        """One chat completion, retried and failed over by the configured rules."""
        options, kwargs = _checked(model, messages, kwargs, streaming=False)
        req = await self._request(model, messages, agent_id, thread_id, metadata, kwargs, options)
        resp: LLMResponse | None = None
        try:
            async for attempt in self._retrying(req):
                with attempt:
                    resp = await self._try(req)
        except _TryFailed:
            raise self._final_error(req) from req.last_exc
        assert resp is not None
        return resp

    def stream(self, model: str, messages: list[dict[str, Any]], *,
               agent_id: str | None = None, thread_id: str | None = None,
               metadata: dict[str, Any] | None = None, **kwargs: Any) -> LLMStream:
        """An async iterator of text deltas; ``.response`` holds the LLMResponse once it ends."""
        options, kwargs = _checked(model, messages, kwargs, streaming=True)
        return LLMStream(self, model, messages, agent_id, thread_id, metadata, kwargs, options)

    async def _open_stream(self, req: Request) -> tuple[ResolvedBackend, Any, list[Any], bool, float, float]:
        """Open a stream with the same tries as complete(), up to its first content.

        A stream that breaks or ends empty before any content reached the
        caller is a failed try like any other.  The gate stays held by the stream.
        """
        opened = None
        try:
            async for attempt in self._retrying(req):
                with attempt:
                    opened = await self._try(req, stream=True)
        except _TryFailed:
            raise self._final_error(req) from req.last_exc
        return opened  # type: ignore[return-value]

    def _retrying(self, req: Request) -> AsyncRetrying:
        return AsyncRetrying(stop=stop_after_attempt(req.tries),
                             retry=retry_if_exception_type(_TryFailed), reraise=True)

    async def _request(self, model: str, messages: list[dict[str, Any]], agent_id: str | None,
                       thread_id: str | None, metadata: dict[str, Any] | None,
                       kwargs: dict[str, Any], options: CallOptions) -> Request:
        bare, candidates = self.route(model)
        retries = self.config.retries if options.retries is None else options.retries
        req = Request(bare, messages, kwargs, agent_id, thread_id, dict(metadata or {}), candidates,
                      options, retries + 1)
        if self._strategy.rotates:
            req.turn = await self._state.next_turn(bare)
        return req

    async def _choose(self, req: Request) -> ResolvedBackend:
        """The backend for the next try; sleeps only while every candidate cools down."""
        while True:
            pool = [b for b in req.candidates if b.name not in req.dropped]
            if not pool:
                raise self._final_error(req) from req.last_exc
            cooling = await self._state.cooldowns(b.name for b in pool)
            ready = [b for b in pool if b.name not in cooling]
            fresh = [b for b in ready if b.name not in req.failed]
            if fresh or ready:
                chosen = self._strategy.pick(fresh or ready, req.candidates, req.turn, self._load)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: try %d -> %s (%s; ready %s; cooling %s)", req.model,
                              len(req.attempts) + 1, chosen.name, self.config.strategy,
                              [b.name for b in fresh or ready], sorted(cooling))
                return chosen
            wait = min(cooling.values())
            log.debug("%s: every backend cools down; waiting %.2fs", req.model, wait)
            await asyncio.sleep(wait)

    def _load(self, backend: ResolvedBackend) -> float:
        return self._gates[backend.name].load

    def _reservation(self, req: Request, backend: ResolvedBackend) -> int:
        """Tokens to reserve in a rate-limited backend's bucket: prompt estimate + max_tokens."""
        if backend.rate_limit_tpm is None:
            return 0
        if req.estimate is None:
            req.estimate = _litellm.token_estimate(req.model, req.messages, req.kwargs.get("tools"))
        out = req.kwargs.get("max_tokens") or req.kwargs.get("max_completion_tokens")
        return req.estimate + int(out or self.config.default_max_tokens)

    def litellm_router(self) -> Any:
        """A ``litellm.Router`` over this config's model list (``"<backend>/<model>"`` names).

        Not used by ``complete()``, which picks the deployment itself and calls
        LiteLLM directly (see ``_litellm.Deployments``); for code that wants
        LiteLLM's own Router over the same backends.  Its retries, fallbacks
        and cooldowns are off, and calls through it are not accounted here.
        """
        return _litellm.build_router(self.backends, self.config.timeout)

    def _deployments(self) -> _litellm.Deployments:
        if self._llm is None:
            self._llm = _litellm.Deployments(self.backends, self.config.pricing)
            _litellm.register(self.id, self)
        return self._llm

    def _call_meta(self, req: Request, backend: ResolvedBackend, tag: str) -> dict[str, Any]:
        return {**req.metadata, "xpl_router": self.id, "xpl_backend": backend.name, "xpl_try": tag,
                "agent_id": req.agent_id, "thread_id": req.thread_id, "xpl_model": req.model}

    async def _try(self, req: Request, stream: bool = False) -> Any:
        """One provider call on the backend the strategy picks.

        A backend whose provider refuses a parameter before anything is sent is
        dropped and the next one is picked at once: that is not a try.
        """
        while True:
            backend = await self._choose(req)
            gate = self._gates[backend.name]
            taken = await gate.enter(self._reservation(req, backend))
            llm = self._deployments()
            tag = _litellm.new_try()
            start = time.perf_counter()
            held = False
            used = 0
            raw = None
            try:
                kwargs = req.kwargs
                if stream:
                    kwargs = {**kwargs, "stream": True,
                              "stream_options": {**kwargs.get("stream_options", {}), "include_usage": True}}
                raw = await llm.acompletion(backend.name, req.model, messages=req.messages,
                                            metadata=self._call_meta(req, backend, tag),
                                            timeout=req.options.timeout,
                                            drop_params=req.options.drop_params, **kwargs)
                if stream:
                    first, ended = await first_chunks(raw)
                    held = True
                    return backend, raw, first, ended, taken, start
                used = _litellm.usage_of(raw)["total_tokens"]
            except Exception as exc:
                if stream and raw is not None:
                    await _close_quietly(raw)
                if not _litellm.sent(tag):
                    self._not_sent(req, backend, exc)
                    continue
                await self._failed(req, backend, exc, (time.perf_counter() - start) * 1000)
            finally:
                _litellm.forget(tag)
                if not held:
                    gate.leave(taken, used)
            break
        latency = (time.perf_counter() - start) * 1000
        cost_usd = _litellm.response_cost(raw, req.model, backend.provider.litellm_prefix)
        resp = _litellm.to_response(raw, backend.name, latency, cost_usd)
        await self._ledger.record(self._event(req, backend, resp.usage, resp.cost_usd, latency, "ok",
                                              _litellm.call_id(raw)))
        return resp

    def _not_sent(self, req: Request, backend: ResolvedBackend, exc: Exception) -> None:
        """LiteLLM failed before sending: not the provider's failure, so no cooldown and no try.

        A parameter the backend's provider does not take drops that backend for
        this request (the next candidate may take it); anything else is the
        request's own fault and raises ``BadRequestError``.
        """
        verdict = classify(exc, _litellm.cause(exc))
        if verdict is not None and verdict.action is Action.UNSUPPORTED:
            req.dropped.add(backend.name)
            req.unsupported[backend.name] = _unsupported(exc)
            log.info("%s: %s (%s) does not take %s; nothing sent, trying the next backend", req.model,
                     backend.name, backend.provider.name, req.unsupported[backend.name])
            return
        raise BadRequestError(
            f"{req.model}: LiteLLM could not build the request for {backend.name} "
            f"({backend.provider.name}), so nothing was sent: {self._redact(_short(exc))}; check the "
            f"messages and parameters", req.attempts) from exc

    async def _failed(self, req: Request, backend: ResolvedBackend, exc: Exception,
                      latency_ms: float) -> None:
        """Classify a failed try, cool the backend down or drop it, record it, then raise."""
        verdict = classify(exc, _litellm.cause(exc))
        if verdict is None:
            await self._ledger.record(self._event(req, backend, None, None, latency_ms, "error:internal"))
            raise exc
        req.attempts.append(Attempt(backend.name, verdict.kind, verdict.status, self._redact(_short(exc))))
        req.verdicts.append(verdict)
        req.last_exc = exc
        if verdict.action is Action.FATAL:
            await self._ledger.record(self._event(req, backend, None, None, latency_ms,
                                                  f"error:{verdict.label}"))
            raise BadRequestError(f"{req.model}: {backend.name} rejected the request "
                                  f"({verdict.status}): {self._redact(_short(exc))}", req.attempts,
                                  verdict.status or 400) from exc
        wait = None
        if verdict.action is Action.NEXT_BACKEND:
            req.dropped.add(backend.name)
        else:
            req.failed.add(backend.name)
            wait = cooldown(verdict, len(req.attempts) - 1, self.config.retry_base_delay,
                            self.config.retry_max_delay)
            await self._state.cool_down(backend.name, wait)
        final = (len(req.attempts) >= req.tries
                 or all(b.name in req.dropped for b in req.candidates))
        await self._ledger.record(self._event(req, backend, None, None, latency_ms,
                                              f"{'error' if final else 'retried'}:{verdict.label}"))
        log.info("%s: try %d/%d on %s failed (%s %s)%s; %s", req.model, len(req.attempts),
                 req.tries, backend.name, verdict.kind, verdict.status or "",
                 f", cooling down {wait:.2f}s" if wait is not None else ", dropped for this request",
                 "giving up" if final else "trying again")
        raise _TryFailed()

    def _redact(self, text: str) -> str:
        """Provider error text with any configured key masked (some providers echo a bad key)."""
        for b in self.backends:
            key = b.api_key.get_secret_value() if b.api_key is not None else ""
            if len(key) >= 8 and key in text:
                text = text.replace(key, f"{key[:3]}...{key[-4:]}")
        return text

    def _final_error(self, req: Request) -> BackendError:
        tries = "; ".join(str(a) for a in req.attempts) or "none"
        msg = f"{req.model}: all {len(req.attempts)} tries failed ({tries})"
        last = req.verdicts[-1] if req.verdicts else None
        if req.unsupported and not (last is not None and last.action is Action.RETRY):
            refused = "; ".join(f"{b} ({next(c.provider.name for c in req.candidates if c.name == b)}) "
                                f"does not take {what}" for b, what in req.unsupported.items())
            tried = f" (tries: {tries})" if req.attempts else ""
            return BadRequestError(
                f"{req.model}: no backend takes the request's parameters, so nothing was sent to "
                f"them: {refused}{tried}. Fix: set drop_params: true in the llm: block or on the "
                f"backend, or pass drop_params=True, to have them dropped; or remove them",
                req.attempts)
        if last is not None and last.kind == "rate_limit":
            return RateLimitError(msg + "; slow down or raise retries", req.attempts, last.retry_after)
        if last is not None and last.kind == "unreachable":
            return ProviderError(msg + "; the backend could not be reached (connection refused or "
                                 "name not resolved): check its base_url and the network", req.attempts)
        if last is not None and last.action is Action.RETRY:
            return ProviderError(msg + "; the provider is failing, try later", req.attempts, last.status)
        return NoBackendError(msg + "; every backend turned it away: check the backends' keys and "
                              "models (xml-pipeline-llm check)", req.attempts)

    # ------------------------------------------------------------ usage

    def _event(self, req: Request, backend: ResolvedBackend, usage: dict[str, int] | None,
               cost_usd: float | None, latency_ms: float, outcome: str, call_id: str = "") -> UsageEvent:
        usage = usage or {}
        return UsageEvent(
            timestamp=time.time(), agent_id=req.agent_id or "", thread_id=req.thread_id or "",
            model=req.model, backend=backend.name, provider=backend.provider.name,
            prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
            total_tokens=usage.get("total_tokens", 0), cost_usd=cost_usd, latency_ms=latency_ms,
            outcome=outcome, call_id=call_id)

    def _record_from_callback(self, meta: dict[str, Any], kwargs: dict[str, Any], response: Any,
                              start: Any, end: Any) -> None:
        """LiteLLM's success callback: count the call unless the router already did."""
        backend = next((b for b in self.backends if b.name == meta.get("xpl_backend")), None)
        if backend is None:
            return
        usage = _litellm.usage_of(response)
        try:
            latency = (end - start).total_seconds() * 1000
        except Exception:
            latency = 0.0
        event = UsageEvent(
            timestamp=time.time(), agent_id=meta.get("agent_id") or "", thread_id=meta.get("thread_id") or "",
            model=meta.get("xpl_model") or "", backend=backend.name, provider=backend.provider.name,
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
            total_tokens=usage["total_tokens"], cost_usd=_litellm.response_cost(response, meta.get("xpl_model") or "", backend.provider.litellm_prefix),
            latency_ms=latency,
            outcome="ok", call_id=str(kwargs.get("litellm_call_id") or ""))
        self._ledger.record_nowait(event)

    def usage_events(self) -> list[UsageEvent]:
        """The usage events this router recorded (the newest 100,000), oldest first."""
        return list(self._ledger.events())

    def get_agent_usage(self, agent_id: str | None) -> AgentUsage:
        """Totals for one agent (all zeros for an agent never seen)."""
        return self._ledger.get("agent", agent_id)

    def get_all_usage(self, by: str = "agent") -> dict[str, AgentUsage]:
        """Totals per agent (or per ``model``, ``backend``, ``thread``)."""
        return self._ledger.totals(by)

    def reset_agent_usage(self, agent_id: str | None = None) -> None:
        """Forget one agent's totals, or all totals; a durable ledger keeps its rows."""
        self._ledger.reset(agent_id)

    def export_usage_csv(self, path: str, by: str = "agent") -> int:
        """Write usage as CSV grouped ``by`` agent, model, backend, thread, or one row per ``event``."""
        if by == "event":
            return write_csv(path, by, events=self._ledger.events())
        return write_csv(path, by, totals=self._ledger.totals(by) if by in ("agent", "model", "backend", "thread") else None)

    async def aclose(self) -> None:
        """Flush and close the usage store and the shared-state connection."""
        if self._ledger.store is not None:
            await self._ledger.store.close()
        await self._state.close()

    def close(self) -> None:
        """``aclose`` for code outside an event loop (``configure_router`` replacing a router)."""
        if self._ledger.store is not None:
            self._ledger.store.flush()


def _serves(backend: ResolvedBackend, model: str) -> bool:
    from .providers import matches
    return matches(model, backend.model_rule)


async def _close_quietly(wrapper: Any) -> None:
    close = getattr(wrapper, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


def _checked(model: Any, messages: Any, kwargs: dict[str, Any],
             streaming: bool) -> tuple[CallOptions, dict[str, Any]]:
    check_call(model, messages)
    return split_options(kwargs, streaming=streaming)


def _unsupported(exc: BaseException) -> str:
    """The parameters LiteLLM names in an ``UnsupportedParamsError`` (for the message only)."""
    text = str(exc)
    start, end = text.find("parameters: ["), text.find("]")
    return text[start + len("parameters: "):end + 1] if 0 <= start < end else "a parameter"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
