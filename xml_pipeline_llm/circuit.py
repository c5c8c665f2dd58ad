"""A circuit breaker per backend: stop calling a backend that fails, then probe it.

Settings (``llm.circuit``, and ``circuit:`` on a backend for its own)::

    circuit: {failure_rate: 50, min_calls: 10, window: 30s, open_for: 30s}

When at least ``min_calls`` tries ended within the last ``window`` and at least
``failure_rate`` percent of them failed on the server's side (5xx, timeout,
unreachable, connection, a bad response; never a 4xx or a 429), the backend
opens: no call goes to it for ``open_for``.  Then it is half open: exactly one
call (the probe) is let through, while the others still see it open; the
probe's success closes it, its failure opens it again.  Every try that reached
the backend counts in ``min_calls`` and in the rate's denominator.
``circuit: false`` (or ``enabled: false``) turns it off.

The request loop sees an open backend as one cooling down (``Breakers.blocked``)
and asks ``admit`` before a try; ``record`` hears how every try ended.
``MemoryBreakers`` keeps this per process; ``shared.circuit.RedisBreakers``
shares it through the router's Redis state (``shared_state``), atomically (Lua,
Redis time); ``stores.make_breakers`` picks one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .pacing import parse_duration

log = logging.getLogger("xml_pipeline_llm")

#: the error kinds (``retry.KINDS``) that count as the backend's own failure
SERVER_SIDE = frozenset({"server_error", "timeout", "unreachable", "connection", "bad_response"})
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
PROBE_POLL = 0.25       # seconds a request waiting on a probe looks again


def seconds(value: Any) -> Any:
    """A duration as seconds: a number, or a string such as ``30s``, ``2m``, ``1m30s``, ``500ms``."""
    if isinstance(value, bool):
        return value            # refused by the float check, with the usual message
    if isinstance(value, str):
        parsed = parse_duration(value)
        if parsed is None:
            raise ValueError(f"not a duration: {value!r}")
        return parsed
    return value


Duration = Annotated[float, BeforeValidator(seconds), Field(gt=0)]


class CircuitConfig(BaseModel):
    """``llm.circuit`` or a backend's ``circuit:`` (a backend's keys override the ``llm`` ones)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    enabled: bool = True
    failure_rate: float = Field(default=50.0, gt=0, le=100)
    min_calls: int = Field(default=10, gt=0)
    window: Duration = 30.0
    open_for: Duration = 30.0


def circuit_block(value: Any) -> Any:
    """``circuit: false`` is ``{enabled: false}``, ``circuit: true`` the defaults."""
    return {"enabled": value} if isinstance(value, bool) else value


EXPECTED = {
    "circuit": "a mapping with failure_rate, min_calls, window, open_for (or false to turn it off)",
    "circuit.enabled": "true or false",
    "circuit.failure_rate": "a percentage above 0 and at most 100, such as 50",
    "circuit.min_calls": "a positive integer (tries in the window before the rate counts)",
    "circuit.window": "a positive duration: seconds, or a string such as 30s or 2m",
    "circuit.open_for": "a positive duration: seconds, or a string such as 30s or 2m",
}


@dataclass(frozen=True)
class CircuitSettings:
    enabled: bool = True
    failure_rate: float = 50.0
    min_calls: int = 10
    window: float = 30.0
    open_for: float = 30.0

    def describe(self) -> str:
        if not self.enabled:
            return "circuit off"
        return (f"circuit opens at {self.failure_rate:g}% server errors of >= {self.min_calls} tries in "
                f"{self.window:g}s, for {self.open_for:g}s")


def settings(config: Any) -> dict[str, CircuitSettings]:
    """Each backend's circuit settings (``config``: a ``RouterConfig``): ``llm.circuit`` with the
    backend's own ``circuit:`` keys over them."""
    raw = config.raw
    top = getattr(raw, "circuit", None) or CircuitConfig()
    out: dict[str, CircuitSettings] = {}
    for b in config.backends:
        merged = top.model_dump()
        own = getattr(raw.backends[b.index], "circuit", None) if b.index < len(raw.backends) else None
        if own is not None:
            merged.update({k: getattr(own, k) for k in own.model_fields_set})
        out[b.name] = CircuitSettings(**merged)
    return out


class Breakers(Protocol):
    """The breakers of a router's backends (in memory or in Redis)."""

    async def blocked(self, backends: Iterable[str]) -> dict[str, float]: ...
    async def admit(self, backend: str) -> bool: ...
    def record(self, backend: str, kind: str | None) -> None: ...
    def state(self, backend: str) -> str: ...


@dataclass
class _Breaker:
    settings: CircuitSettings
    state: str = CLOSED
    open_until: float = 0.0
    probe_until: float = 0.0
    probe_ttl: float = 60.0

    def __post_init__(self) -> None:
        self.calls: deque[tuple[float, bool]] = deque()      # (when, failed) of the tries in the window
        self.bad = 0                                          # how many of them failed

    def forget(self) -> None:
        self.calls.clear()
        self.bad = 0


class MemoryBreakers:
    """The breakers of this process (no shared state)."""

    def __init__(self, conf: Mapping[str, CircuitSettings], probe_ttl: Mapping[str, float] | None = None) -> None:
        self._b = {name: _Breaker(s, probe_ttl=(probe_ttl or {}).get(name, 60.0))
                   for name, s in conf.items() if s.enabled}
        self._lock = threading.Lock()

    def _advance(self, b: _Breaker, now: float) -> None:
        if b.state == OPEN and now >= b.open_until:
            b.state, b.probe_until = HALF_OPEN, 0.0

    async def blocked(self, backends: Iterable[str]) -> dict[str, float]:
        """Seconds each open backend stays out (a half-open one whose probe is out: a short while)."""
        out: dict[str, float] = {}
        now = time.monotonic()
        with self._lock:
            for name in backends:
                b = self._b.get(name)
                if b is None:
                    continue
                self._advance(b, now)
                if b.state == OPEN:
                    out[name] = b.open_until - now
                elif b.state == HALF_OPEN and b.probe_until > now:
                    out[name] = min(PROBE_POLL, b.probe_until - now)
        return out

    async def admit(self, backend: str) -> bool:
        """Whether a try may go to ``backend`` now (half open: the first asker gets the probe)."""
        now = time.monotonic()
        with self._lock:
            b = self._b.get(backend)
            if b is None:
                return True
            self._advance(b, now)
            if b.state == CLOSED:
                return True
            if b.state == HALF_OPEN and b.probe_until <= now:
                b.probe_until = now + b.probe_ttl
                return True
            return False

    def record(self, backend: str, kind: str | None) -> None:
        """A try on ``backend`` ended: ``kind`` None for success, else its error kind."""
        now = time.monotonic()
        failed = kind in SERVER_SIDE
        with self._lock:
            b = self._b.get(backend)
            if b is None:
                return
            self._advance(b, now)
            s = b.settings
            if b.state == HALF_OPEN and b.probe_until > 0:
                if failed:
                    b.state, b.open_until = OPEN, now + s.open_for
                    log.warning("circuit of %s opens again: the probe failed (%s); no calls for %gs",
                                backend, kind, s.open_for)
                else:
                    b.state = CLOSED
                    b.forget()
                    log.warning("circuit of %s closes: the probe succeeded", backend)
                return
            if b.state != CLOSED:
                return
            b.calls.append((now, failed))
            b.bad += failed
            edge = now - s.window
            while b.calls and b.calls[0][0] <= edge:
                b.bad -= b.calls.popleft()[1]
            n, bad = len(b.calls), b.bad
            if n >= s.min_calls and bad * 100 >= s.failure_rate * n:
                b.state, b.open_until = OPEN, now + s.open_for
                b.forget()
                log.warning("circuit of %s opens: %d of the last %d tries in %gs failed on the server's "
                            "side; no calls for %gs", backend, bad, n, s.window, s.open_for)

    def state(self, backend: str) -> str:
        with self._lock:
            b = self._b.get(backend)
            if b is None:
                return CLOSED
            self._advance(b, time.monotonic())
            return b.state
