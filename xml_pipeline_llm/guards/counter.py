"""Call caps and loop windows per thread, in memory (``guards/fleet.py`` keeps them in Redis)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config.guards import GuardsConfig

log = logging.getLogger("xml_pipeline_llm")

THREAD_IDLE_TTL = 7 * 86400  # seconds: with Redis, a thread's call count is forgotten this long after its last call


# ---------------------------------------------------------------- in memory: call caps and loops

@dataclass
class _Thread:
    calls: int = 0
    recent: dict[str, deque[float]] = field(default_factory=dict)   # request hash -> when sent (monotonic)


@dataclass(frozen=True)
class Verdict:
    """What the counter said: ``kind`` "" (admitted), "loop" or "call_limit", and the count."""

    kind: str
    count: int
    token: str = ""        # what undoes an admission (Redis: the member id)


ADMITTED = Verdict("", 0)


class Counter:
    """Call counts and loop windows per thread, in this process (exact under one lock)."""

    def __init__(self, cfg: GuardsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_calls = cfg.max_calls_per_thread
        self.limit = cfg.repeat_limit
        self.window = cfg.window_seconds
        self._clock = clock
        self._threads: dict[str, _Thread] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def check(self, thread: str, digest: str) -> Verdict:
        """Count the request unless it is refused (then it counts towards nothing)."""
        now = self._clock()
        with self._lock:
            t = self._threads.get(thread)
            if t is None:
                t = self._threads[thread] = _Thread()
            if self.max_calls is not None and t.calls >= self.max_calls:
                return Verdict("call_limit", t.calls)
            times = None
            if self.limit is not None and digest:
                times = t.recent.get(digest)
                if times is None:
                    times = t.recent[digest] = deque()
                edge = now - self.window
                while times and times[0] <= edge:
                    times.popleft()
                if len(times) >= self.limit:
                    return Verdict("loop", len(times) + 1)
                times.append(now)
            if self.max_calls is not None:
                t.calls += 1
            if now - self._swept > max(self.window, 60.0):
                self._sweep(now)
            return Verdict("", t.calls, digest)

    def undo(self, thread: str, verdict: Verdict) -> None:
        """Take back an admission (the request was refused by something else, or cancelled)."""
        with self._lock:
            t = self._threads.get(thread)
            if t is None:
                return
            if self.max_calls is not None and t.calls:
                t.calls -= 1
            times = t.recent.get(verdict.token) if verdict.token else None
            if times:
                times.pop()

    def _sweep(self, now: float) -> None:
        """Drop loop windows that ended, and threads with nothing left to remember (caller holds the lock)."""
        self._swept = now
        edge = now - self.window
        for name in list(self._threads):
            t = self._threads[name]
            for digest in [d for d, times in t.recent.items() if not times or times[-1] <= edge]:
                del t.recent[digest]
            if not t.recent and not t.calls:
                del self._threads[name]

    def forget(self, thread: str) -> None:
        with self._lock:
            self._threads.pop(thread, None)


def request_digest(model: str, messages: list[dict[str, Any]], kwargs: Mapping[str, Any]) -> str:
    """SHA-256 of the request as the provider would get it: the model asked for, the messages and every
    provider parameter (tools included), as JSON with sorted keys (so key order does not matter)."""
    body = json.dumps({"model": model, "messages": messages, "params": kwargs}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=_jsonable)
    return hashlib.sha256(body.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """Parameters JSON does not know (a pydantic model class as response_format, a set, bytes) as text."""
    schema = getattr(value, "model_json_schema", None)
    if callable(schema):
        try:
            return {"$schema_of": getattr(value, "__name__", ""), "schema": schema()}
        except Exception:  # noqa: BLE001 - fall back to its text
            pass
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)
