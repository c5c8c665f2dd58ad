"""Which backend takes the next try: failover, round-robin, least-loaded.

A strategy is given the backends that can take the try now (serving the
model, not cooling down, not dropped for this request; those with
``rate_limit_rpm`` headroom only, when there are any: a backend whose window
of starts is full is busy) and returns one.
None of them waits or keeps state of its own: round-robin's position comes
from the shared state, so that it is exact per model and across processes.

Your own strategy is any object with this shape, passed as
``configure_router({"llm": {"strategy": MyStrategy(), ...}})``:

    class MyStrategy:
        rotates = False      # True: the router draws a round-robin turn per request
        def pick(self, ready, candidates, turn, load): return ready[0]

``ready`` is never empty; ``candidates`` are all of the model's backends in
file order; ``load(b)`` is (in flight + queued) / max_concurrent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, get_args

if TYPE_CHECKING:
    from .backends import ResolvedBackend

StrategyName = Literal["failover", "round-robin", "least-loaded"]
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)

Load = Callable[["ResolvedBackend"], float]


class Strategy(Protocol):
    """Picks one of the ready backends for a try."""

    rotates: bool   # needs a round-robin turn per request

    def pick(self, ready: Sequence[ResolvedBackend], candidates: Sequence[ResolvedBackend],
             turn: int, load: Load) -> ResolvedBackend: ...


def preference(b: ResolvedBackend) -> tuple[int, int]:
    """Failover order: lower priority first, then file order."""
    return (b.priority, b.index)


class Failover:
    """The most preferred ready backend."""

    rotates = False

    def pick(self, ready: Sequence[ResolvedBackend], candidates: Sequence[ResolvedBackend],
             turn: int, load: Load) -> ResolvedBackend:
        return min(ready, key=preference)


class RoundRobin:
    """The request's turn picks a start in the candidates (file order); the first ready one from there."""

    rotates = True

    def pick(self, ready: Sequence[ResolvedBackend], candidates: Sequence[ResolvedBackend],
             turn: int, load: Load) -> ResolvedBackend:
        n = len(candidates)
        for i in range(n):
            backend = candidates[(turn + i) % n]
            if backend in ready:
                return backend
        return min(ready, key=preference)


class LeastLoaded:
    """The ready backend with the lowest (in flight + queued) / max_concurrent; ties by preference."""

    rotates = False

    def pick(self, ready: Sequence[ResolvedBackend], candidates: Sequence[ResolvedBackend],
             turn: int, load: Load) -> ResolvedBackend:
        return min(ready, key=lambda b: (load(b), *preference(b)))


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "failover": Failover,
    "round-robin": RoundRobin,
    "least-loaded": LeastLoaded,
}
assert tuple(STRATEGIES) == STRATEGY_NAMES


def is_strategy(value: object) -> bool:
    """Whether ``value`` is a strategy object (for ``strategy:`` given as an object)."""
    return callable(getattr(value, "pick", None)) and isinstance(getattr(value, "rotates", None), bool)
