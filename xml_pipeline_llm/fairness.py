"""Who may go next when a backend is full: fair shares by tokens, then priorities.

Waiters for a backend's limits (slots, tokens) are not served oldest-first
but in this order:

1. priority: ``high`` before ``normal`` before ``low``, across all agents; a
   ``low`` request that has waited ``llm.priority_aging`` seconds (30) is
   served as ``normal``, so nothing starves;
2. within a priority, start-time fair queueing across agents, by tokens: a
   waiter of agent *a* asking for *c* tokens gets the start tag
   ``S = max(V, F_a)`` and agent *a*'s finish tag becomes ``F_a = S + c / w_a``
   (``w_a`` its weight from ``llm.agents``, default 1; ``V`` is the start tag
   of the waiter served last).  The smallest start tag goes next, so each
   backlogged agent gets tokens in proportion to its weight, an agent of large
   requests as much as one of small ones, and an agent with one request waits
   for about one turn of each other agent, not behind their queues;
3. within one agent and priority: arrival order.

Why start-time fair queueing rather than deficit round robin: it needs no
quantum to tune, serves a request of any size in one turn (DRR makes a large
request wait several rounds for its deficit), and its tags order waiters
exactly, so the existing head-of-line rules still hold: the waiter at the head
is never overtaken, which is how a large request is never starved by small
ones on a token bucket (its start tag becomes the smallest and it then waits
at the head for its tokens).

``FairQueue`` is not thread-safe by itself: the limit that owns it calls it
under its own lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, get_args

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[str, ...] = get_args(Priority)
_RANK = {"high": 0, "normal": 1, "low": 2}
ANONYMOUS = "(none)"      # the agent of requests without agent_id


@dataclass(frozen=True)
class Turn:
    """Who is asking: the agent (and its weight), the request's worst-case tokens, its priority."""

    agent: str = ANONYMOUS
    weight: float = 1.0
    cost: float = 1.0
    priority: Priority = "normal"


NO_TURN = Turn()


class Waiter:
    """One task waiting for a limit: its future, its place in the fair order, what it was handed."""

    __slots__ = ("fut", "granted", "turn", "since", "start", "seq", "amount")

    def __init__(self, turn: Turn, amount: float = 0.0) -> None:
        self.fut: asyncio.Future[None] | None = None
        self.granted = False
        self.turn = turn
        self.since = time.monotonic()
        self.start = 0.0
        self.seq = 0
        self.amount = amount


class FairQueue:
    """Waiters in fair order: ``push``, ``peek`` (the next to serve), ``pop``, ``remove``."""

    def __init__(self, aging: float = 30.0) -> None:
        self.aging = aging
        self._queues: dict[tuple[int, str], deque[Waiter]] = {}
        self._finish: dict[str, float] = {}       # per agent: finish tag of its last waiter
        self._virtual = 0.0
        self._seq = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, w: Waiter) -> None:
        t = w.turn
        w.start = max(self._virtual, self._finish.get(t.agent, 0.0))
        self._finish[t.agent] = w.start + max(t.cost, 1.0) / max(t.weight, 1e-9)
        self._seq += 1
        w.seq = self._seq
        self._queues.setdefault((_RANK[t.priority], t.agent), deque()).append(w)
        self._count += 1

    def peek(self) -> Waiter | None:
        """The waiter to serve next (None: nobody waits)."""
        best: Waiter | None = None
        best_key: tuple[int, float, int] | None = None
        now = time.monotonic()
        for (rank, _), q in self._queues.items():
            head = q[0]
            if rank == 2 and now - head.since >= self.aging:
                rank = 1                            # a low request that waited long enough
            key = (rank, head.start, head.seq)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def pop(self) -> Waiter | None:
        """Take the next waiter out (it is served now)."""
        w = self.peek()
        if w is not None:
            self.served(w)
        return w

    def served(self, w: Waiter) -> None:
        """``w`` got what it waited for: out of the queue, and the virtual time moves to its start."""
        self._virtual = max(self._virtual, w.start)
        self.remove(w)

    def remove(self, w: Waiter) -> None:
        """``w`` leaves the queue (served, cancelled or timed out)."""
        key = (_RANK[w.turn.priority], w.turn.agent)
        q = self._queues[key]
        q.remove(w)
        if not q:
            del self._queues[key]
        self._count -= 1
        if not self._count:                      # idle: start afresh (tags stay small)
            self._finish.clear()
            self._virtual = 0.0
