"""State that every request of a router shares: limits, cooldowns, rotation (and fleet usage).

What may differ between one process and a fleet is typed here, once:
``State`` (the gates, cooldowns and round-robin turns), ``BackendGate`` (one
backend's limits: ``enter`` returns a ``Reservation`` that ``leave`` takes
back) and ``SharedUsage`` (fleet-wide usage totals).  ``MemoryState`` keeps
it in this process; ``shared.state.RedisState`` shares it across processes.
Either can be passed to ``LLMRouter(config, state=...)``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from .budgets import Budgets, Clock, Restore
from .fairness import Turn
from .limits import Gate, Reservation

if TYPE_CHECKING:
    from .config import BudgetConfig
    from .usage import AgentUsage, UsageEvent


class BackendGate(Protocol):
    """One backend's limits: concurrency slots, (with ``rate_limit_tpm``) a token bucket and (with
    ``rate_limit_rpm``) a window of starts; ``has_capacity``: a call could start now as far as the
    requests-per-minute limit goes."""

    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def load(self) -> float: ...        # (in flight + queued) / max_concurrent
    @property
    def has_capacity(self) -> bool: ...
    def min_wait(self, tokens: int) -> float: ...     # seconds at least before such a call could start
    async def enter(self, tokens: int, turn: Turn = ...) -> Reservation: ...
    def leave(self, reservation: Reservation, used: int) -> None: ...


class SharedUsage(Protocol):
    """Usage totals kept beyond the process (the fleet's, in Redis); None answers: unreachable."""

    async def append(self, event: UsageEvent) -> None: ...
    def append_nowait(self, event: UsageEvent) -> None: ...
    def flush(self) -> None: ...
    async def close(self) -> None: ...
    def totals(self, by: str = "agent") -> dict[str, AgentUsage] | None: ...
    def get(self, by: str, key: str | None) -> AgentUsage | None: ...
    def reset(self, agent_id: str | None = None) -> bool: ...


class State(Protocol):
    """Limits, cooldowns and rotation shared by every request of a router."""

    @property
    def usage(self) -> SharedUsage | None: ...
    def gate(self, backend: str, max_concurrent: int, tpm: int | None,
             rpm: int | None = None) -> BackendGate: ...
    async def cooldowns(self, backends: Iterable[str]) -> dict[str, float]: ...
    async def cool_down(self, backend: str, seconds: float) -> None: ...
    async def next_turn(self, model: str) -> int: ...
    def budgets(self, rules: Iterable[BudgetConfig], clock: Clock, restore: Restore | None) -> Budgets: ...
    async def close(self) -> None: ...


class MemoryState:
    """In-process shared state (the default: nothing to install)."""

    usage: SharedUsage | None = None

    def __init__(self, priority_aging: float = 30.0) -> None:
        self.priority_aging = priority_aging
        self._gates: dict[str, Gate] = {}
        self._cool_until: dict[str, float] = {}
        self._turns: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()     # threads with loops of their own share this state

    def gate(self, backend: str, max_concurrent: int, tpm: int | None, rpm: int | None = None) -> Gate:
        """The limits of ``backend`` (created on first use)."""
        with self._lock:
            gate = self._gates.get(backend)
            if gate is None:
                gate = self._gates[backend] = Gate(max_concurrent, tpm, rpm, self.priority_aging)
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

    def budgets(self, rules: Iterable[BudgetConfig], clock: Clock, restore: Restore | None) -> Budgets:
        """This process's budgets (restored from a durable ledger's spend, if it has one)."""
        return Budgets(rules, clock, restore)

    async def close(self) -> None:
        """Nothing to release in memory; the Redis state closes its connection here."""
