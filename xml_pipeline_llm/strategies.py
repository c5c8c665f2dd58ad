"""The three ways to choose among the backends that can take a try (contract C4).

Each strategy is given the backends ready now (serving the model, not cooling
down, not dropped for this request) and returns one.  None of them waits or
keeps state of its own: round-robin's position comes from the shared state so
that it is exact per model and can be shared across processes.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from .config import ResolvedBackend


def preference(b: ResolvedBackend) -> tuple[int, int]:
    """Failover order: lower priority first, then file order."""
    return (b.priority, b.index)


class Strategy(Protocol):
    rotates: bool   # needs a round-robin turn per request

    def pick(self, ready: Sequence[ResolvedBackend], candidates: Sequence[ResolvedBackend],
             turn: int, load: Callable[[ResolvedBackend], float]) -> ResolvedBackend: ...


class Failover:
    """The most preferred ready backend."""

    rotates = False

    def pick(self, ready, candidates, turn, load):  # type: ignore[no-untyped-def]
        return min(ready, key=preference)


class RoundRobin:
    """The request's turn picks a start in the candidates (file order); the first ready one from there."""

    rotates = True

    def pick(self, ready, candidates, turn, load):  # type: ignore[no-untyped-def]
        n = len(candidates)
        for i in range(n):
            backend = candidates[(turn + i) % n]
            if backend in ready:
                return backend
        return min(ready, key=preference)


class LeastLoaded:
    """The ready backend with the lowest (in flight + queued) / max_concurrent; ties by preference."""

    rotates = False

    def pick(self, ready, candidates, turn, load):  # type: ignore[no-untyped-def]
        return min(ready, key=lambda b: (load(b), *preference(b)))


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "failover": Failover,
    "round-robin": RoundRobin,
    "least-loaded": LeastLoaded,
}
