"""Which backend takes the next try: failover, round-robin, least-loaded, lowest-latency.

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
file order; ``load(b)`` is (in flight + queued) / max_concurrent.  A strategy
that also has ``pick_model(model, ready, candidates, turn, load)`` is asked
that instead (it is told the model), and one with ``observe(backend, model,
seconds)`` hears how long each successful try took (``lowest-latency``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

if TYPE_CHECKING:
    from .backends import ResolvedBackend

StrategyName = Literal["failover", "round-robin", "least-loaded", "lowest-latency"]
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


class LowestLatency:
    """The ready backend with the lowest recent latency for the model: an exponentially weighted
    mean of its successful tries (time to first token for streams).

    Exploration: a candidate not picked for the last ``explore_every`` picks of
    the model (10) gets the next one, and one never measured goes first, so a
    backend that was slow, or failed and recovered, is measured again within a
    few dozen calls.  Ties (nothing measured yet) go by preference.  Kept per
    process.
    """

    rotates = False

    def __init__(self, alpha: float = 0.3, explore_every: int = 10) -> None:
        self.alpha = alpha
        self.explore_every = explore_every
        self._mean: dict[tuple[str, str], float] = {}
        self._picks: dict[str, int] = {}
        self._last: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def observe(self, backend: str, model: str, seconds: float) -> None:
        """A successful try of ``model`` on ``backend`` took ``seconds`` (to its first token, streamed)."""
        with self._lock:
            key = (backend, model)
            old = self._mean.get(key)
            self._mean[key] = seconds if old is None else old + self.alpha * (seconds - old)

    def latency(self, backend: str, model: str) -> float | None:
        """The weighted mean latency in seconds (None: not measured yet)."""
        with self._lock:
            return self._mean.get((backend, model))

    def pick(self, ready: Sequence[ResolvedBackend], candidates: Sequence[ResolvedBackend],
             turn: int, load: Load) -> ResolvedBackend:
        return self.pick_model("", ready, candidates, turn, load)

    def pick_model(self, model: str, ready: Sequence[ResolvedBackend], candidates: Sequence[ResolvedBackend],
                   turn: int, load: Load) -> ResolvedBackend:
        with self._lock:
            n = self._picks.get(model, 0)
            if len(ready) > 1:
                stale = [b for b in ready if n - self._last.get((model, b.name), n - self.explore_every)
                         >= self.explore_every]
                unmeasured = [b for b in ready if (b.name, model) not in self._mean]
                if unmeasured:
                    chosen = min(unmeasured, key=preference)
                elif stale:
                    chosen = min(stale, key=lambda b: (self._last.get((model, b.name), -1), *preference(b)))
                else:
                    chosen = min(ready, key=lambda b: (self._mean[(b.name, model)], *preference(b)))
            else:
                chosen = ready[0]
            self._picks[model] = n + 1
            self._last[(model, chosen.name)] = n + 1
            return chosen


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "failover": Failover,
    "round-robin": RoundRobin,
    "least-loaded": LeastLoaded,
    "lowest-latency": LowestLatency,
}
assert tuple(STRATEGIES) == STRATEGY_NAMES


def choose(strategy: Strategy, model: str, ready: Sequence[ResolvedBackend],
           candidates: Sequence[ResolvedBackend], turn: int, load: Load) -> ResolvedBackend:
    """Ask ``strategy`` for a backend: by ``pick_model`` (told the model) if it has one, else ``pick``."""
    by_model: Any = getattr(strategy, "pick_model", None)
    if by_model is not None:
        chosen: ResolvedBackend = by_model(model, ready, candidates, turn, load)
        return chosen
    return strategy.pick(ready, candidates, turn, load)


def is_strategy(value: object) -> bool:
    """Whether ``value`` is a strategy object (for ``strategy:`` given as an object)."""
    return callable(getattr(value, "pick", None)) and isinstance(getattr(value, "rotates", None), bool)
