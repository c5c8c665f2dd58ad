"""State that every request of a router shares: limits, cooldowns, rotation.

``MemoryState`` keeps it in this process.  The methods are the whole interface
the router uses, so a Redis implementation sharing the same state across
processes (contract C8) can replace it without touching the router.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from .limits import Gate


class MemoryState:
    """In-process shared state (the default: nothing to install)."""

    def __init__(self) -> None:
        self._gates: dict[str, Gate] = {}
        self._cool_until: dict[str, float] = {}
        self._turns: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()     # threads with loops of their own share this state

    def gate(self, backend: str, max_concurrent: int, tpm: int | None) -> Gate:
        """The limits of ``backend`` (created on first use)."""
        with self._lock:
            gate = self._gates.get(backend)
            if gate is None:
                gate = self._gates[backend] = Gate(max_concurrent, tpm)
            return gate

    async def cooldowns(self, backends: Iterable[str]) -> dict[str, float]:
        """Seconds of cooldown left for each of ``backends`` that is cooling down."""
        now = time.monotonic()
        out = {}
        for name in backends:
            until = self._cool_until.get(name)
            if until is not None and until > now:
                out[name] = until - now
        return out

    async def cool_down(self, backend: str, seconds: float) -> None:
        """Keep ``backend`` out of rotation for ``seconds`` (a longer cooldown already set wins)."""
        until = time.monotonic() + seconds
        with self._lock:
            if until > self._cool_until.get(backend, 0.0):
                self._cool_until[backend] = until

    async def next_turn(self, model: str) -> int:
        """Round-robin position for ``model``: 0, 1, 2, ... per call."""
        with self._lock:
            turn = self._turns[model]
            self._turns[model] = turn + 1
            return turn

    async def close(self) -> None:
        """Nothing to release in memory; the Redis state closes its connection here."""


def make_state(config: Any) -> Any:
    """The state for a router: ``RedisState`` with ``shared_state`` set (C8), else ``MemoryState``.

    Building a ``RedisState`` checks that Redis answers, raising ``ConfigError``
    (naming the URL without its password) when it does not.
    """
    url = getattr(config, "shared_state", None)
    if not url:
        return MemoryState()
    from .shared.state import RedisState

    return RedisState(url, getattr(config, "redis_prefix", "xpl") or "xpl")
