"""OpenTelemetry spans and metrics, and the Prometheus endpoint.

Active when ``opentelemetry-api`` is importable (``pip install 'xml-pipeline-llm[otel]'``)
and ``llm.telemetry.otel`` is not false; otherwise the router gets ``NOOP``, chosen
once when it is built, whose hooks do nothing (one method call each per try).

* Spans (the API's global tracer provider): one ``chat {model}`` span (kind
  CLIENT) per ``complete()``/``stream()`` request and a child ``try {backend}``
  span (kind CLIENT) per provider try, with the GenAI semantic-convention
  attributes (``gen_ai.usage.cache_read.input_tokens``,
  ``gen_ai.usage.cache_creation.input_tokens`` and
  ``gen_ai.usage.reasoning.output_tokens`` included) and ``xpl.*`` (agent,
  backend, cost, outcome, try number, cooldown).  A stream's spans end when the stream ends.
* Metrics (the API's global meter provider, and with ``prometheus_port`` an SDK
  meter provider of its own serving ``/metrics``): the GenAI client histograms
  with the conventions' bucket boundaries, ``xpl.requests``, ``xpl.cost``, and
  observable gauges per backend (in flight, queued, cooling down) and per budget.
  The histograms and counters are fed by the ledger's counted events (the
  ``on_usage`` path), so they add up to the ledger's totals exactly.
* Never in a span or metric: a key (attributes are names, numbers and the
  server's host and port), nor message text unless ``capture_content: true``
  (then masked for the configured keys).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from .instruments import LIVE, SCOPE, instruments, prometheus
from .redact import mask
from .usage import CACHE_HIT

if TYPE_CHECKING:
    from .config import RouterConfig
    from .lifecycle import Try
    from .request import Request
    from .response import LLMResponse
    from .usage import UsageEvent, UsageLedger

#: ``gen_ai.provider.name`` for providers the conventions name differently from LiteLLM.
PROVIDER_NAMES = {"xai": "x_ai", "mistral": "mistral_ai", "azure": "azure.ai.openai", "gemini": "gcp.gemini",
                  "vertex_ai": "gcp.vertex_ai", "bedrock": "aws.bedrock", "watsonx": "ibm.watsonx.ai"}


class NoTelemetry:
    """Telemetry off (``llm.telemetry.otel: false``) or not installed: every hook does nothing."""

    enabled = False
    metrics_url: str | None = None

    def request(self, req: Request, stream: bool) -> contextlib.AbstractContextManager[None]:
        return _NULL

    def try_started(self, t: Try) -> None:
        pass

    def sending(self, t: Try) -> contextlib.AbstractContextManager[object]:
        """Around the provider call: the try's span is the current span (LiteLLM's and HTTP spans nest in it)."""
        return _NULL

    def try_ended(self, t: Try, event: UsageEvent, resp: LLMResponse | None = None,
                  cooldown: float | None = None) -> None:
        pass

    def try_exited(self, t: Try, exc: BaseException | None) -> None:
        pass

    def waiting(self, req: Request, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


_NULL: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
NOOP = NoTelemetry()


def available() -> bool:
    """Whether ``opentelemetry-api`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        return False


class GateLoad(Protocol):
    """What the gauges read of one backend's gate (``state.BackendGate`` has it)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def queued(self) -> int: ...


class Readouts(Protocol):
    """What telemetry reads for its gauges, and nothing else: one backend's gate and its circuit
    breaker's state by name, and the budgets' statuses (objects with ``scope``, ``key``,
    ``remaining_tokens``, ``remaining_usd``).  Held weakly: the gauges go quiet when the object
    that gives them is gone."""

    def gate(self, backend: str) -> GateLoad: ...

    def budgets(self) -> Any: ...

    def circuit(self, backend: str) -> str: ...     # "closed", "open" or "half_open"


def make_telemetry(config: RouterConfig, readouts: Readouts, ledger: UsageLedger,
                   secrets: Iterable[str] = ()) -> NoTelemetry:
    """The router's telemetry: ``OTelTelemetry`` when installed and not switched off, else ``NOOP``.

    It hears of calls through its hooks (``request``, ``try_started``, ``sending``, ``try_ended``,
    ``try_exited``, ``waiting``) and the ledger's usage events, and reads ``readouts`` for the gauges.
    """
    if not config.telemetry.otel or not available():
        return NOOP
    return OTelTelemetry(config, readouts, ledger, secrets)


def provider_name(provider: str) -> str:
    return PROVIDER_NAMES.get(provider, provider)


class OTelTelemetry(NoTelemetry):
    """Spans through the global tracer provider; metrics through the global meter provider (and Prometheus)."""

    enabled = True

    def __init__(self, config: RouterConfig, readouts: Readouts, ledger: UsageLedger,
                 secrets: Iterable[str] = ()) -> None:
        from opentelemetry import metrics, trace

        self._trace = trace
        self._kind = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._tracer = trace.get_tracer(SCOPE)
        self._capture = config.telemetry.capture_content
        self._secrets = [s for s in secrets if s]
        self._servers = {b.name: _server(b.base_url) for b in config.backends}
        self._backends = [b.name for b in config.backends]
        self._cooling: dict[str, float] = {}        # backend -> monotonic end of its cooldown (this process)
        self._readouts = weakref.ref(readouts)
        self._spans = _SpanMap()        # request -> its span while its tries run (the request holds none)
        self._instruments = [instruments(metrics.get_meter_provider())]
        t = config.telemetry
        if t.prometheus_port is not None:
            provider, self.metrics_url = prometheus(t.prometheus_host, t.prometheus_port)
            self._instruments.append(instruments(provider))
        self._unsubscribe = ledger.listeners.add(self._on_event)
        LIVE.add(self)

    # ---------------------------------------------------------- spans

    @contextlib.contextmanager
    def request(self, req: Request, stream: bool) -> Iterator[None]:
        attrs = _call_attributes(req)
        if self._capture:
            attrs["gen_ai.input.messages"] = mask(json.dumps(req.messages, default=str), self._secrets)
        self._spans.put(req, _RequestSpan(self._tracer.start_span(f"chat {req.model}", kind=self._kind,
                                                                  attributes=attrs), stream))
        try:
            yield
        except BaseException as exc:
            self._end_request(req, type(exc).__name__)
            raise
        if not stream:
            self._end_request(req, None)

    def _end_request(self, req: Request, error_type: str | None) -> None:
        held = self._spans.pop(req)
        if held is None or held.ended:
            return
        held.ended = True
        span = held.span
        span.set_attribute("xpl.tries", held.tries)
        if error_type is not None:
            span.set_attributes({"error.type": error_type, "xpl.outcome": "error"})
            span.set_status(self._error)
        span.end()

    def try_started(self, t: Try) -> None:
        held = self._spans.get(t.req)
        if held is None:
            return
        held.tries += 1
        backend = t.backend
        attrs = _call_attributes(t.req)
        attrs.update({"gen_ai.provider.name": provider_name(backend.provider.name), "xpl.backend": backend.name,
                      "xpl.try": held.tries})
        host, port = self._servers.get(backend.name, (None, None))
        if host:
            attrs["server.address"] = host
        if port:
            attrs["server.port"] = port
        context = self._trace.set_span_in_context(held.span)
        t.span = self._tracer.start_span(f"try {backend.name}", context=context, kind=self._kind,
                                         attributes=attrs)

    def sending(self, t: Try) -> contextlib.AbstractContextManager[object]:
        if t.span is None:
            return _NULL
        # the try's outcome, not the exception as such, sets its status (try_ended)
        return self._trace.use_span(t.span, end_on_exit=False, record_exception=False,
                                    set_status_on_exception=False)

    def try_ended(self, t: Try, event: UsageEvent, resp: LLMResponse | None = None,
                  cooldown: float | None = None) -> None:
        span, t.span = t.span, None
        if cooldown is not None:
            self._cooling[t.backend.name] = time.monotonic() + cooldown
        if span is None:
            return
        attrs = self._ended_attributes(event, resp, cooldown)
        span.set_attributes(attrs)
        if not event.succeeded:
            span.set_attribute("error.type", event.outcome.partition(":")[2] or event.outcome)
            span.set_status(self._error)
        span.end()
        held = self._spans.get(t.req)
        if held is not None and resp is not None and not held.ended:      # the try that served it
            if event.succeeded:
                attrs.pop("xpl.cooldown_s", None)
                held.span.set_attributes({**attrs, "xpl.backend": t.backend.name,
                                          "gen_ai.provider.name": provider_name(t.backend.provider.name)})
            if held.stream:             # a stream's request ends with its stream
                self._end_request(t.req, None if event.succeeded else event.outcome.partition(":")[2])

    def _ended_attributes(self, event: UsageEvent, resp: LLMResponse | None,
                          cooldown: float | None) -> dict[str, Any]:
        attrs: dict[str, Any] = {"gen_ai.usage.input_tokens": event.prompt_tokens,
                                 "gen_ai.usage.output_tokens": event.completion_tokens,
                                 "xpl.outcome": event.outcome}
        if event.cost_usd is not None:
            attrs["xpl.cost_usd"] = event.cost_usd
        if cooldown is not None:
            attrs["xpl.cooldown_s"] = round(cooldown, 3)
        if resp is not None:       # prompt-cache and reasoning parts of the tokens above (0: none reported)
            attrs["gen_ai.usage.cache_read.input_tokens"] = event.cached_tokens
            attrs["gen_ai.usage.cache_creation.input_tokens"] = event.cache_write_tokens
            attrs["gen_ai.usage.reasoning.output_tokens"] = event.reasoning_tokens
            attrs["gen_ai.response.model"] = resp.model
            attrs["gen_ai.response.finish_reasons"] = [resp.finish_reason] if resp.finish_reason else []
            if self._capture:
                attrs["gen_ai.output.messages"] = mask(json.dumps(
                    [{"role": "assistant", "content": resp.content}]), self._secrets)
        return attrs

    def try_exited(self, t: Try, exc: BaseException | None) -> None:
        """A try that ended without an event: LiteLLM refused it before sending (or it was cancelled)."""
        span, t.span = t.span, None
        if span is not None:
            span.set_attribute("xpl.outcome", "not_sent")
            if exc is not None:
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(self._error)
            span.end()

    def waiting(self, req: Request, seconds: float) -> None:
        held = self._spans.get(req)
        if held is not None:
            held.span.add_event("xpl.waiting_for_cooldown", {"xpl.wait_s": round(seconds, 3)})

    # ---------------------------------------------------------- metrics

    def _on_event(self, event: UsageEvent) -> None:
        """One counted usage event into the histograms and counters (every try, ledger-exact)."""
        attrs: dict[str, Any] = {"gen_ai.operation.name": "chat",
                                 "gen_ai.provider.name": provider_name(event.provider),
                                 "gen_ai.request.model": event.model, "xpl.backend": event.backend,
                                 "xpl.agent_id": event.agent_id or "(none)"}
        if event.outcome == CACHE_HIT:      # the response cache answered: no provider call to measure
            for ins in self._instruments:
                ins.cache_hits.add(1, attrs)
                if event.saved_usd:
                    ins.saved.add(event.saved_usd, attrs)
            return
        timed = attrs if event.succeeded else {**attrs, "error.type": event.outcome.partition(":")[2]}
        counted = {**attrs, "xpl.outcome": event.outcome}
        for ins in self._instruments:
            if event.succeeded or event.total_tokens:
                ins.tokens.record(event.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
                ins.tokens.record(event.completion_tokens, {**attrs, "gen_ai.token.type": "output"})
            ins.duration.record(event.latency_ms / 1000, timed)
            ins.requests.add(1, counted)
            if event.cost_usd is not None:
                ins.cost.add(event.cost_usd, attrs)

    def gauges(self) -> Iterator[tuple[str, float, dict[str, Any]]]:
        """(gauge, value, attributes) for this router's backends and budgets, for the observable gauges."""
        readouts = self._readouts()
        if readouts is None:
            return
        now = time.monotonic()
        for name in self._backends:
            gate = readouts.gate(name)
            attrs = {"xpl.backend": name}
            yield "in_flight", gate.in_flight, attrs
            yield "queued", gate.queued, attrs
            yield "cooling_down", 1 if self._cooling.get(name, 0.0) > now else 0, attrs
            yield "circuit_open", 0 if readouts.circuit(name) == "closed" else 1, attrs
        yield from _budget_gauges(readouts)

    def close(self) -> None:
        self._unsubscribe()
        LIVE.discard(self)


class _RequestSpan:
    """A request's span while its tries run (in the telemetry's ``_SpanMap``)."""

    __slots__ = ("span", "stream", "tries", "ended")

    def __init__(self, span: Any, stream: bool) -> None:
        self.span = span
        self.stream = stream
        self.tries = 0
        self.ended = False


class _SpanMap:
    """Request spans by the request they belong to, by identity (requests compare by value).

    An entry leaves when its request's span ends, or when the request is collected
    (a stream dropped unread), so the map never outgrows the requests alive.
    """

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[int, _RequestSpan] = {}

    def put(self, req: object, held: _RequestSpan) -> None:
        key = id(req)
        self._by_id[key] = held
        weakref.finalize(req, self._by_id.pop, key, None)

    def get(self, req: object) -> _RequestSpan | None:
        return self._by_id.get(id(req))

    def pop(self, req: object) -> _RequestSpan | None:
        return self._by_id.pop(id(req), None)


def _call_attributes(req: Request) -> dict[str, Any]:
    attrs: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.request.model": req.model,
                             "xpl.agent_id": req.agent_id or "(none)"}
    max_tokens = req.kwargs.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        attrs["gen_ai.request.max_tokens"] = max_tokens
    if req.thread_id:
        attrs["gen_ai.conversation.id"] = req.thread_id
    return attrs


def _server(base_url: str | None) -> tuple[str | None, int | None]:
    """The host and port of a backend's base_url (never its path, query or credentials)."""
    if not base_url:
        return None, None
    try:
        parts = urlsplit(base_url)
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None, None


def _budget_gauges(readouts: Readouts) -> Iterator[tuple[str, float, dict[str, Any]]]:
    """``xpl.budget.remaining`` per budget: asks ``readouts.budgets()`` when it has it."""
    budgets = getattr(readouts, "budgets", None)
    if not callable(budgets):
        return
    try:
        statuses = budgets()
    except Exception:
        return
    if not isinstance(statuses, list):      # not a list of BudgetStatus (a coroutine, say): nothing to show
        return
    for st in statuses:
        base = {"xpl.budget.scope": str(getattr(st, "scope", "")), "xpl.budget.key": str(getattr(st, "key", ""))}
        for unit, name in (("tokens", "remaining_tokens"), ("usd", "remaining_usd")):
            value = getattr(st, name, None)
            if isinstance(value, (int, float)):
                yield "budget_remaining", value, {**base, "xpl.budget.unit": unit}
