"""Per-backend scripting state and statistics for the provider simulator.

Tests script the simulator from their own thread while the aiohttp loop runs
in another, so every read and write of this state goes through one
``threading.Lock``. Critical sections are tiny and never span an ``await``.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .quota import Quota, QuotaStats

#: Backend name whose settings every other backend inherits unless it has its own.
ALL_BACKENDS = "*"

FAULT_KINDS = ("status", "timeout", "stall", "drop", "malformed", "missing_fields")


@dataclass(frozen=True)
class Fault:
    """One injected failure; build it with the class-method constructors.

    Frozen so a fault list can be shared between scripts and fault rates
    without one test mutating another's behaviour.
    """

    kind: str
    code: int | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    retry_after_date: float | datetime | str | None = None
    seconds: float = 0.0
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")

    @classmethod
    def status(
        cls,
        code: int,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        retry_after_date: float | datetime | str | None = None,
        message: str | None = None,
    ) -> Fault:
        """HTTP error ``code`` in the provider's error format.

        ``retry_after`` sends ``Retry-After: <seconds>`` (fractions are kept, e.g.
        ``0.4``, so tests need not wait whole seconds); ``retry_after_date``
        (seconds from now, a datetime, or a ready string) sends it as an
        HTTP-date instead; ``retry_after_ms`` sends ``retry-after-ms``.
        """
        return cls("status", code=code, retry_after=retry_after, retry_after_ms=retry_after_ms,
                   retry_after_date=retry_after_date, message=message)

    @classmethod
    def timeout(cls, seconds: float) -> Fault:
        """Sleep ``seconds`` and then answer normally, so short client timeouts fire."""
        return cls("timeout", seconds=seconds)

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """A stream sends the first half of its frames (text included), then goes quiet for ``seconds``
        before the rest; an answer that is not streamed waits ``seconds`` (as ``timeout``)."""
        return cls("stall", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without sending any response."""
        return cls("drop")

    @classmethod
    def malformed(cls) -> Fault:
        """200 with the right content-type but a truncated, invalid JSON body."""
        return cls("malformed")

    @classmethod
    def missing_fields(cls) -> Fault:
        """200 with valid JSON that lacks choices / content / message."""
        return cls("missing_fields")


@dataclass(frozen=True)
class UsageDetails:
    """Prompt-cache and reasoning figures the simulator reports (``Simulator.set_usage_details``).

    ``cached`` and ``cache_write`` are shares of each request's prompt tokens
    read from and written to the provider's prompt cache; ``reasoning_tokens``
    are added to each answer's completion tokens as reasoning.
    """

    cached: float = 0.0
    cache_write: float = 0.0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.cached <= 1.0 and 0.0 <= self.cache_write <= 1.0
                and self.cached + self.cache_write <= 1.0):
            raise ValueError(f"cached and cache_write are shares of the prompt within [0, 1] whose sum is "
                             f"at most 1, got {self.cached} and {self.cache_write}")
        if self.reasoning_tokens < 0:
            raise ValueError(f"reasoning_tokens must be >= 0, got {self.reasoning_tokens}")


NO_DETAILS = UsageDetails()


@dataclass(frozen=True)
class RecordedRequest:
    """What arrived on the wire, for tests that check LiteLLM's request shape.

    Header names are lower-cased so lookups do not depend on client casing.
    """

    method: str
    path: str
    headers: dict[str, str]
    json: Any


@dataclass
class BackendStats:
    """Counters for one backend (or the sum over all of them).

    ``prompt_tokens``/``completion_tokens`` sum what the simulator reported to
    clients (every input token, cached or not; reasoning included in completion);
    ``cached_tokens``, ``cache_write_tokens`` and ``reasoning_tokens`` the
    prompt-cache and reasoning parts of them it reported;
    ``completion_tokens_generated`` counts every reply it produced,
    including OpenAI streams sent without a usage chunk.
    """

    requests: int = 0
    ok: int = 0
    faulted: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    completion_tokens_generated: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    last_request: RecordedRequest | None = None


@dataclass
class _Config:
    """Behaviour knobs; ``None`` means 'inherit from the ``*`` backend'."""

    latency: float | None = None
    chunk_latency: float | None = None
    fault_rate: float | None = None
    faults: tuple[Fault, ...] = ()
    rng: random.Random | None = None
    api_key: str | None = None
    details: UsageDetails | None = None
    script: deque[Fault] = field(default_factory=deque)


@dataclass(frozen=True)
class Plan:
    """Resolved behaviour for one request, computed at arrival."""

    latency: float
    chunk_latency: float
    api_key: str | None
    fault: Fault | None
    details: UsageDetails = NO_DETAILS


class Registry:
    """Thread-safe store of per-backend configuration and statistics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._configs: dict[str, _Config] = {}
        self._stats: dict[str, BackendStats] = {}
        self._global_in_flight = 0
        self._global_peak = 0
        self._last_request: RecordedRequest | None = None
        self._quotas: dict[str, Quota] = {}

    # ---- scripting (called from any thread) ----

    def _config(self, backend: str) -> _Config:
        return self._configs.setdefault(backend, _Config())

    def script(self, backend: str, faults: list[Fault]) -> None:
        """Append ``faults`` to the backend's queue, consumed one per request."""
        with self._lock:
            self._config(backend).script.extend(faults)

    def set_fault_rate(self, backend: str, rate: float, faults: list[Fault], seed: int | None) -> None:
        """Inject a random one of ``faults`` into a ``rate`` share of requests."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {rate}")
        if rate > 0 and not faults:
            raise ValueError("a positive fault rate needs at least one fault")
        with self._lock:
            cfg = self._config(backend)
            cfg.fault_rate, cfg.faults, cfg.rng = rate, tuple(faults), random.Random(seed)

    def set_latency(self, backend: str, seconds: float, per_chunk: float) -> None:
        """Delay before answering and before each streamed chunk."""
        with self._lock:
            cfg = self._config(backend)
            cfg.latency, cfg.chunk_latency = seconds, per_chunk

    def require_key(self, backend: str, key: str | None) -> None:
        """Demand this API key (``None`` lifts the demand)."""
        with self._lock:
            self._config(backend).api_key = key

    def set_usage_details(self, backend: str, details: UsageDetails) -> None:
        """Report prompt-cache and reasoning tokens in this backend's usage."""
        with self._lock:
            self._config(backend).details = details

    def set_quota(self, backend: str, quota: Quota | None) -> None:
        """Enforce and report ``quota`` for ``backend`` (None: no quota)."""
        with self._lock:
            if quota is None:
                self._quotas.pop(backend, None)
            else:
                self._quotas[backend] = quota

    def charge(self, backend: str, tokens: int, fmt: str) -> tuple[bool, dict[str, str]]:
        """Count a call against the backend's quota: (allowed, its rate-limit headers); no quota: allowed."""
        with self._lock:
            quota = self._quotas.get(backend)
            if quota is None:
                return True, {}
            return quota.charge(tokens, fmt)

    def quota_stats(self, backend: str) -> QuotaStats | None:
        with self._lock:
            quota = self._quotas.get(backend)
            return None if quota is None else quota.stats()

    def reset(self, backend: str | None) -> None:
        """Forget configuration and statistics of one backend, or of all."""
        with self._lock:
            names = list(self._configs) if backend is None else [backend]
            for name in names:
                self._configs.pop(name, None)
            for name in list(self._quotas) if backend is None else [backend]:
                self._quotas.pop(name, None)
            self._reset_stats_locked(backend)

    def reset_stats(self, backend: str | None) -> None:
        """Zero the counters; requests still in flight stay counted."""
        with self._lock:
            self._reset_stats_locked(backend)

    def _reset_stats_locked(self, backend: str | None) -> None:
        names = list(self._stats) if backend is None else [backend]
        for name in names:
            old = self._stats.get(name)
            if old is not None:
                self._stats[name] = BackendStats(in_flight=old.in_flight, peak_in_flight=old.in_flight)
        if backend is None:
            self._global_peak = self._global_in_flight
            self._last_request = None

    # ---- statistics (read from any thread) ----

    def stats(self, backend: str) -> BackendStats:
        """A snapshot copy, so callers never see later updates half-applied."""
        with self._lock:
            return replace(self._stats.get(backend) or BackendStats())

    def total_stats(self) -> BackendStats:
        """Sums over all backends; peak is the global concurrent maximum."""
        with self._lock:
            total = BackendStats(in_flight=self._global_in_flight, peak_in_flight=self._global_peak,
                                 last_request=self._last_request)
            for st in self._stats.values():
                total.requests += st.requests
                total.ok += st.ok
                total.faulted += st.faulted
                total.prompt_tokens += st.prompt_tokens
                total.completion_tokens += st.completion_tokens
                total.completion_tokens_generated += st.completion_tokens_generated
                total.cached_tokens += st.cached_tokens
                total.cache_write_tokens += st.cache_write_tokens
                total.reasoning_tokens += st.reasoning_tokens
            return total

    # ---- server side (called on the event loop) ----

    def arrive(self, backend: str, record: RecordedRequest) -> Plan:
        """Count the request and decide now how to treat it (arrival order)."""
        with self._lock:
            st = self._stats.setdefault(backend, BackendStats())
            st.requests += 1
            st.in_flight += 1
            st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
            st.last_request = self._last_request = record
            self._global_in_flight += 1
            self._global_peak = max(self._global_peak, self._global_in_flight)
            plan = self._plan_locked(backend)
            if plan.fault is not None:
                st.faulted += 1
            return plan

    def _plan_locked(self, backend: str) -> Plan:
        own = self._config(backend)
        fault = own.script.popleft() if own.script else None
        source = own if own.fault_rate is not None else self._configs.get(ALL_BACKENDS, _Config())
        if fault is None and source.fault_rate and source.rng is not None:
            if source.rng.random() < source.fault_rate:
                fault = source.rng.choice(source.faults)
        return self._resolve_locked(backend, fault)

    def _resolve_locked(self, backend: str, fault: Fault | None) -> Plan:
        own = self._configs.get(backend, _Config())
        base = self._configs.get(ALL_BACKENDS, _Config())
        return Plan(
            latency=_pick(own.latency, base.latency, 0.0),
            chunk_latency=_pick(own.chunk_latency, base.chunk_latency, 0.0),
            api_key=_pick(own.api_key, base.api_key, None),
            fault=fault,
            details=_pick(own.details, base.details, NO_DETAILS),
        )

    def peek(self, backend: str) -> Plan:
        """Resolved latency/key for a side endpoint, without consuming any fault."""
        with self._lock:
            return self._resolve_locked(backend, None)

    def depart(self, backend: str) -> None:
        """The response has ended (or the handler was cancelled)."""
        with self._lock:
            st = self._stats.setdefault(backend, BackendStats())
            st.in_flight = max(0, st.in_flight - 1)
            self._global_in_flight = max(0, self._global_in_flight - 1)

    def succeed(self, backend: str, prompt: int, completion: int, reported: bool,
                cached: int = 0, cache_write: int = 0, reasoning: int = 0) -> None:
        """A full successful response was sent; add the usage it carried."""
        with self._lock:
            st = self._stats.setdefault(backend, BackendStats())
            st.ok += 1
            st.completion_tokens_generated += completion
            if reported:
                st.prompt_tokens += prompt
                st.completion_tokens += completion
                st.cached_tokens += cached
                st.cache_write_tokens += cache_write
                st.reasoning_tokens += reasoning


def _pick(own: Any, inherited: Any, default: Any) -> Any:
    """First non-None of a backend's own value, the ``*`` value, the default."""
    if own is not None:
        return own
    return inherited if inherited is not None else default
