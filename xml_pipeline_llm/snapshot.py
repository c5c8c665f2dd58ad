"""One picture of the router now: who spends what, which backends are busy, cooling down or failing.

``await snapshot(router)`` returns a ``Snapshot`` (frozen dataclasses, JSON
with ``to_json``/``from_json``): per agent the requests, tokens and dollars of
the last minute, total spend and how much of its budget is used; per backend
the calls in flight, waiting, the cooldown left, the circuit state and its
last minute; every budget in use; the last errors.  The gateway serves it as
``GET /v1/snapshot`` and draws it at ``GET /ui``; ``xml-pipeline-llm top``
shows it in a terminal.

Per-minute figures come from the usage events: the first ``snapshot(router)``
subscribes a ``Recent`` window to ``router.on_usage`` (seeded with the
router's events of the last minute), kept as long as the router lives.
``assemble`` builds a snapshot from totals, recent events and backend states
read anywhere else (Redis, a SQLite ledger: ``watch.py``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

#: outcomes that are not failures: a provider answer, and a response-cache hit
SERVED = ("ok", "cache_hit")

if TYPE_CHECKING:
    from .budgets import BudgetStatus
    from .router import LLMRouter
    from .usage import AgentUsage, UsageEvent

WINDOW = 60.0          # seconds the per-minute figures cover
ERRORS = 20            # failed tries kept for ``errors``
NO_AGENT = "(none)"


@dataclass(frozen=True)
class AgentRow:
    """One agent: the last minute (requests that ended, tokens, dollars) and its totals."""

    agent: str
    requests_per_min: int = 0           # requests served or failed in the last minute
    tokens_per_min: int = 0             # tokens of every try in the last minute
    usd_per_min: float = 0.0            # dollars of the priced tries in the last minute
    errors_per_min: int = 0             # failed tries (retried or final) in the last minute
    spend_usd: float | None = None      # total dollars (None: no priced call yet)
    total_tokens: int = 0
    requests: int = 0                   # requests served, in total
    errors: int = 0                     # requests that failed, in total
    budget_percent: float | None = None  # the fullest budget of this agent (tokens or dollars), 0-100+


@dataclass(frozen=True)
class BackendRow:
    """One backend: its load now and its last minute.  None: not known from where this was read."""

    backend: str
    provider: str = ""
    max_concurrent: int | None = None
    in_flight: int | None = None
    queued: int | None = None
    cooling_down: float = 0.0           # seconds of cooldown left (0: not cooling down)
    circuit: str = "closed"
    requests_per_min: int = 0           # tries in the last minute
    tokens_per_min: int = 0
    errors_per_min: int = 0             # failed tries in the last minute
    spend_usd: float | None = None      # total dollars of its calls


@dataclass(frozen=True)
class BudgetRow:
    """One budget: what ``router.budget_status`` says, plus ``percent`` (the fuller of tokens and dollars)."""

    scope: str
    key: str | None
    percent: float
    used_tokens: int = 0
    limit_tokens: int | None = None
    used_usd: float = 0.0
    limit_usd: float | None = None
    reserved_tokens: int = 0
    reserved_usd: float = 0.0
    window: str = "none"
    resets_at: float | None = None


@dataclass(frozen=True)
class ErrorRow:
    """A failed try: when (UNIX time), whose, where, and its outcome (``retried:<kind>`` or ``error:<kind>``)."""

    time: float
    agent: str
    backend: str
    model: str
    outcome: str


@dataclass(frozen=True)
class Snapshot:
    """The router now.  ``agents`` sorted by spend (then tokens per minute), ``errors`` newest first."""

    taken_at: float
    source: str = "router"
    window: float = WINDOW
    agents: tuple[AgentRow, ...] = ()
    backends: tuple[BackendRow, ...] = ()
    budgets: tuple[BudgetRow, ...] = ()
    errors: tuple[ErrorRow, ...] = ()
    notes: tuple[str, ...] = field(default=())   # what this source cannot tell (e.g. queued across a fleet)

    @property
    def empty(self) -> bool:
        """Nothing recorded yet: no agent, no error."""
        return not self.agents and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        def rows(kind: type[Any], items: Any) -> tuple[Any, ...]:
            names = {f.name for f in fields(kind)}
            return tuple(kind(**{k: v for k, v in item.items() if k in names}) for item in items or ())

        return cls(taken_at=float(data["taken_at"]), source=str(data.get("source", "")),
                   window=float(data.get("window", WINDOW)), agents=rows(AgentRow, data.get("agents")),
                   backends=rows(BackendRow, data.get("backends")), budgets=rows(BudgetRow, data.get("budgets")),
                   errors=rows(ErrorRow, data.get("errors")), notes=tuple(data.get("notes") or ()))

    @classmethod
    def from_json(cls, text: str | bytes) -> Snapshot:
        """A snapshot from ``to_json`` (or ``GET /v1/snapshot``); ValueError when it is not one."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return cls.from_dict(data)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"not a snapshot: {exc}") from None


# ------------------------------------------------------------------ the last minute

class Recent:
    """The usage events of the last ``window`` seconds and the last ``errors`` failed tries (thread-safe)."""

    def __init__(self, window: float = WINDOW, errors: int = ERRORS) -> None:
        self.window = window
        self._events: deque[UsageEvent] = deque()
        self._errors: deque[UsageEvent] = deque(maxlen=errors)
        self._lock = threading.Lock()

    def add(self, event: UsageEvent) -> None:
        if event.outcome == "cache_hit":      # answered by the response cache: no provider try to show
            return
        with self._lock:
            self._events.append(event)
            if event.outcome not in SERVED:
                self._errors.append(event)
            self._prune(time.time())

    def extend(self, events: Iterable[UsageEvent]) -> None:
        for event in events:
            self.add(event)

    def _prune(self, now: float) -> None:
        horizon = now - self.window
        while self._events and self._events[0].timestamp < horizon:
            self._events.popleft()

    def read(self, now: float | None = None) -> tuple[list[UsageEvent], list[UsageEvent]]:
        """The events of the last window (any order) and the last errors, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            self._prune(now)
            horizon = now - self.window
            return [e for e in self._events if e.timestamp >= horizon], list(self._errors)


_WINDOWS: weakref.WeakKeyDictionary[Any, Recent] = weakref.WeakKeyDictionary()
_ATTACH = threading.Lock()


def recent_of(router: LLMRouter) -> Recent:
    """The router's ``Recent`` window, subscribed to ``on_usage`` on first use (seeded with its last minute)."""
    with _ATTACH:
        found = _WINDOWS.get(router)
        if found is not None:
            return found
        window = _WINDOWS[router] = Recent()
        seen: set[int] = set()
        seeding = True

        def listen(event: UsageEvent) -> None:
            if seeding:
                seen.add(id(event))
            window.add(event)

        router.on_usage(listen)
        horizon = time.time() - WINDOW
        past = [e for e in router.usage_events()[-100_000:] if id(e) not in seen]
        window.extend(e for e in past if e.timestamp >= horizon or e.outcome not in SERVED)
        seeding = False
        return window


# ------------------------------------------------------------------ building one

def budget_row(s: BudgetStatus) -> BudgetRow:
    return BudgetRow(scope=s.scope, key=s.key, percent=round(_percent(s), 2), used_tokens=s.used_tokens,
                     limit_tokens=s.limit_tokens, used_usd=s.used_usd, limit_usd=s.limit_usd,
                     reserved_tokens=s.reserved_tokens, reserved_usd=s.reserved_usd, window=s.window,
                     resets_at=s.resets_at)


def _percent(s: BudgetStatus) -> float:
    parts = [0.0]
    if s.limit_tokens:
        parts.append(100.0 * s.used_tokens / s.limit_tokens)
    if s.limit_usd:
        parts.append(100.0 * s.used_usd / s.limit_usd)
    return max(parts)


@dataclass
class BackendState:
    """What is known of one backend's load where the snapshot is taken (None: unknown there)."""

    name: str
    provider: str = ""
    max_concurrent: int | None = None
    in_flight: int | None = None
    queued: int | None = None
    cooling_down: float = 0.0
    circuit: str = "closed"


def assemble(*, agents: Mapping[str, AgentUsage], backends: Mapping[str, AgentUsage],
             states: Sequence[BackendState], recent: Sequence[UsageEvent], errors: Sequence[UsageEvent],
             budgets: Iterable[BudgetStatus], source: str, now: float | None = None,
             window: float = WINDOW, notes: Iterable[str] = ()) -> Snapshot:
    """A ``Snapshot`` from totals per agent and backend, the last window's events, the last errors,
    backend states and budget statuses (wherever they were read)."""
    now = time.time() if now is None else now
    rate = _rates(recent)
    rows = sorted((budget_row(s) for s in budgets), key=lambda b: (-b.percent, b.scope, b.key or ""))
    error_rows = tuple(ErrorRow(time=e.timestamp, agent=e.agent_id or NO_AGENT, backend=e.backend, model=e.model,
                                outcome=e.outcome) for e in sorted(errors, key=lambda e: -e.timestamp))
    return Snapshot(taken_at=now, source=source, window=window, agents=_agent_rows(agents, rate["agent"], rows),
                    backends=_backend_rows(backends, rate["backend"], states), budgets=tuple(rows),
                    errors=error_rows, notes=tuple(notes))


_NO_RATE = (0, 0, 0.0, 0, 0)


def _rates(recent: Sequence[UsageEvent]) -> dict[str, dict[str, list[float]]]:
    """Per agent and per backend over the window: [requests, tokens, usd, errors, tries]."""
    rate: dict[str, dict[str, list[float]]] = {"agent": {}, "backend": {}}
    for e in recent:
        for group, key in (("agent", e.agent_id or NO_AGENT), ("backend", e.backend)):
            if not key:                    # a request the guards refused reached no backend
                continue
            r = rate[group].setdefault(key, [0, 0, 0.0, 0, 0])
            r[0] += e.succeeded or e.ended_in_error
            r[1] += e.total_tokens
            r[2] += e.cost_usd or 0.0
            r[3] += e.outcome != "ok"
            r[4] += 1
    return rate


def _agent_rows(agents: Mapping[str, AgentUsage], rate: Mapping[str, Sequence[float]],
                budgets: Sequence[BudgetRow]) -> tuple[AgentRow, ...]:
    fullest: dict[str, float] = {}
    for b in budgets:
        if b.scope == "agent" and b.key is not None:
            fullest[b.key] = max(fullest.get(b.key, 0.0), b.percent)
    out = []
    for name in set(agents) | set(rate):
        t = agents.get(name) or AgentUsage()
        r = rate.get(name, _NO_RATE)
        out.append(AgentRow(
            agent=name, requests_per_min=int(r[0]), tokens_per_min=int(r[1]), usd_per_min=round(r[2], 10),
            errors_per_min=int(r[3]), spend_usd=t.cost_usd, total_tokens=t.total_tokens,
            requests=t.request_count, errors=t.error_count, budget_percent=fullest.get(name)))
    out.sort(key=lambda a: (-(a.spend_usd or 0.0), -a.usd_per_min, -a.tokens_per_min, a.agent))
    return tuple(out)


def _backend_rows(backends: Mapping[str, AgentUsage], rate: Mapping[str, Sequence[float]],
                  states: Sequence[BackendState]) -> tuple[BackendRow, ...]:
    known = {s.name for s in states}
    extra = [BackendState(name) for name in sorted(set(backends) | set(rate)) if name not in known]
    out = []
    for s in [*states, *extra]:
        r = rate.get(s.name, _NO_RATE)
        t = backends.get(s.name)
        out.append(BackendRow(
            backend=s.name, provider=s.provider, max_concurrent=s.max_concurrent, in_flight=s.in_flight,
            queued=s.queued, cooling_down=round(max(0.0, s.cooling_down), 3), circuit=s.circuit,
            requests_per_min=int(r[4]), tokens_per_min=int(r[1]), errors_per_min=int(r[3]),
            spend_usd=None if t is None else t.cost_usd))
    return tuple(out)


def circuit_of(router: Any, backend: str) -> str:
    """The backend's circuit state when the router has a circuit breaker (``circuit(name)``), else closed."""
    read = getattr(router, "circuit", None)
    if callable(read):
        try:
            return str(read(backend))
        except Exception:      # a snapshot never fails for a figure it cannot read
            return "unknown"
    return "closed"


def budget_keys(config: Any, agents: Iterable[str], recent: Iterable[UsageEvent]) -> list[tuple[str, str | None]]:
    """The budgets worth showing: global, every agent seen, keys a budget names, threads active now."""
    rules = list(config.budgets)
    scopes = {b.scope for b in rules}
    keys: list[tuple[str, str | None]] = [("global", None)] if "global" in scopes else []
    named = {(b.scope, b.match) for b in rules if b.scope != "global" and not any(c in b.match for c in "*?[")}
    if "agent" in scopes:
        named |= {("agent", a) for a in agents if a != NO_AGENT}
    if "thread" in scopes:
        named |= {("thread", e.thread_id) for e in recent if e.thread_id}
    return keys + sorted(named, key=lambda k: (k[0], k[1] or ""))


def _collect(router: LLMRouter, window: Recent) -> tuple[Any, ...]:
    """The blocking reads (the fleet's totals and budgets with Redis), off the event loop."""
    recent, errors = window.read()
    agents = router.get_all_usage("agent")
    budgets = {(s.scope, s.key): s for s in router.budgets()}      # the ones in use here, and set at run time
    for scope, key in budget_keys(router.config, agents, recent):  # and those of every agent of the fleet
        if (scope, key) not in budgets:
            found = router.budget_status(scope, key)
            if found is not None:
                budgets[(scope, key)] = found
    return agents, router.get_all_usage("backend"), list(budgets.values()), recent, errors


async def snapshot(router: LLMRouter, *, source: str = "router") -> Snapshot:
    """The router now: agents, backends, budgets, the last errors (see ``Snapshot``); ``source`` names it.

    Totals and budgets are the fleet's with ``shared_state`` (Redis), the
    per-minute figures this router's own calls; in flight is the fleet's as of
    this process's last admission, queued this process's waiters.
    """
    window = recent_of(router)
    agents, backends, budgets, recent, errors = await asyncio.to_thread(_collect, router, window)
    cooling = await router.cooldowns()
    states = []
    for b in router.backends:
        gate = router.gate(b.name)
        states.append(BackendState(b.name, b.provider.name, b.max_concurrent, gate.in_flight, gate.queued,
                                   cooling.get(b.name, 0.0), circuit_of(router, b.name)))
    shared = router.state.usage is not None
    notes = ("per-minute figures: this process's calls; totals and budgets: the fleet's",) if shared else ()
    return assemble(agents=agents, backends=backends, states=states, recent=recent, errors=errors,
                    budgets=budgets, source=source, notes=notes)
