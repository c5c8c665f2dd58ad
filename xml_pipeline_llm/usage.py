"""Token and cost accounting: one event per provider call, totals per agent/model/backend/thread.

The router records each call exactly once (de-duplicated by LiteLLM's call id,
so the LiteLLM callback and the router's own read-your-writes record cannot
both count it).  ``UsageLedger`` keeps exact totals in memory and, when asked,
appends every event to a durable store (``SqliteStore``) before the caller
gets its answer (contract C7, C8).
"""

from __future__ import annotations

import csv
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .state import SharedUsage

NO_AGENT = "(none)"
GROUPS = {"agent": "agent_id", "model": "model", "backend": "backend", "thread": "thread_id"}
EXPORTS = (*GROUPS, "event")


def check_by(by: str, valid: tuple[str, ...] = tuple(GROUPS)) -> str:
    """``by`` if it is one of ``valid``, else a ValueError listing them."""
    if by not in valid:
        raise ValueError(f"by: expected one of {', '.join(valid)}, got {by!r}")
    return by


@dataclass
class AgentUsage:
    """Totals for one key (an agent, a model, a backend or a thread).

    ``cost_usd`` sums the priced calls; it is None while none had a price (an
    unknown cost is never 0.0, which would claim "free").  ``unpriced_requests``
    counts the successful calls without a price, whose cost the sum leaves out.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    request_count: int = 0
    error_count: int = 0
    cost_usd: float | None = None
    unpriced_requests: int = 0

    def merge(self, other: AgentUsage) -> None:
        """Add another key's totals (a footer row, totals across runs)."""
        for f in fields(self):
            setattr(self, f.name, plus(getattr(self, f.name), getattr(other, f.name)))

    def add(self, event: UsageEvent) -> None:
        self.prompt_tokens += event.prompt_tokens
        self.completion_tokens += event.completion_tokens
        self.total_tokens += event.total_tokens
        if event.succeeded:
            self.request_count += 1
            if event.cost_usd is None:
                self.unpriced_requests += 1
        elif event.ended_in_error:
            self.error_count += 1
        self.cost_usd = plus(self.cost_usd, event.cost_usd)


def plus(a: Any, b: Any) -> Any:
    """``a + b`` where None is "unknown": None only when both are."""
    if a is None or b is None:
        return b if a is None else a
    return a + b


OK = "ok"   # the outcome of a try that served its request; a failed one is retry.outcome()


@dataclass(frozen=True)
class UsageEvent:
    """One provider call.  ``outcome`` is ``ok``, ``retried:<kind>`` or ``error:<kind>``.

    ``model`` is the model sent; ``requested_model`` the name the caller asked
    for (an alias of ``llm.models``, or the first model of a ``fallbacks=``
    call; the same as ``model`` for a plain call; "" in rows of older ledgers).
    """

    timestamp: float
    agent_id: str
    thread_id: str
    model: str
    backend: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    latency_ms: float
    outcome: str
    requested_model: str = ""
    call_id: str = field(default="", compare=False)

    @property
    def succeeded(self) -> bool:
        """The try served its request (a request counted in ``request_count``)."""
        return self.outcome == OK

    @property
    def ended_in_error(self) -> bool:
        """The try was the last of a request that failed (counted in ``error_count``)."""
        return self.outcome.startswith("error:")


def make_event(*, agent_id: str | None, thread_id: str | None, model: str, backend: str, provider: str,
               usage: Mapping[str, int] | None, cost_usd: float | None, latency_ms: float, outcome: str,
               call_id: str = "", requested_model: str | None = None) -> UsageEvent:
    """The one way a usage event is made (by a try, and by LiteLLM's success callback)."""
    usage = usage or {}
    return UsageEvent(timestamp=time.time(), agent_id=agent_id or "", thread_id=thread_id or "",
                      model=model, backend=backend, provider=provider,
                      prompt_tokens=usage.get("prompt_tokens", 0),
                      completion_tokens=usage.get("completion_tokens", 0),
                      total_tokens=usage.get("total_tokens", 0), cost_usd=cost_usd,
                      latency_ms=latency_ms, outcome=outcome,
                      requested_model=model if requested_model is None else requested_model,
                      call_id=call_id)


EVENT_FIELDS = tuple(f.name for f in fields(UsageEvent))       # what the stores keep
EVENT_COLUMNS = [name for name in EVENT_FIELDS if name != "call_id"]   # what an event CSV shows
TOTAL_COLUMNS = [f.name for f in fields(AgentUsage)]
COUNT_COLUMNS = [c for c in TOTAL_COLUMNS if c != "cost_usd"]   # the whole numbers among them


class UsageStore(Protocol):
    """Where events go besides the in-memory totals (the SQLite ledger, Redis)."""

    async def append(self, event: UsageEvent) -> None: ...
    def append_nowait(self, event: UsageEvent) -> None: ...
    def events(self, since: float | None = None) -> Iterator[UsageEvent]: ...
    def flush(self) -> None: ...
    async def close(self) -> None: ...


@runtime_checkable
class SharedUsageStore(Protocol):
    """A usage store that is also the fleet's totals (Redis): reads come from it while it answers."""

    ident: tuple[str, str]

    def totals(self, by: str = "agent") -> dict[str, AgentUsage] | None: ...
    def get(self, by: str, key: str | None) -> AgentUsage | None: ...
    def reset(self, agent_id: str | None = None) -> bool: ...


class UsageLedger:
    """Exact totals per agent, model, backend and thread, plus recent events.

    Totals cost memory per key, not per call.  The in-memory event log keeps
    the newest ``max_events`` events (for ``by="event"`` exports); the SQLite
    store keeps them all.
    """

    def __init__(self, store: UsageStore | None = None, max_events: int = 100_000,
                 shared: SharedUsage | None = None) -> None:
        # ``shared``: fleet-wide totals (``RedisUsageStore``) that reads come from
        # while it answers; the totals kept here are this process's fallback.
        if shared is None and isinstance(store, SharedUsageStore):
            shared = store
        if (isinstance(store, SharedUsageStore) and store is not shared
                and store.ident == getattr(shared, "ident", ())):
            store = shared          # the same Redis totals: write them once
        self.store: UsageStore | None = store
        self.shared: SharedUsage | None = shared
        self._also_shared = shared is not None and id(shared) != id(store)   # a second place to write
        self._totals: dict[str, dict[str, AgentUsage]] = {g: {} for g in GROUPS}
        self._events: deque[UsageEvent] = deque(maxlen=max_events)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def _count(self, event: UsageEvent) -> bool:
        """Add ``event`` to the totals unless its call id was counted already."""
        with self._lock:      # routers are shared by threads running loops of their own
            return self._count_locked(event)

    def _count_locked(self, event: UsageEvent) -> bool:
        if event.call_id:
            if event.call_id in self._seen:
                return False
            self._seen[event.call_id] = None
            if len(self._seen) > 65_536:
                self._seen.popitem(last=False)
        self._events.append(event)
        for group, column in GROUPS.items():
            key = getattr(event, column) or NO_AGENT
            totals = self._totals[group].get(key)
            if totals is None:
                totals = self._totals[group][key] = AgentUsage()
            totals.add(event)
        return True

    async def record(self, event: UsageEvent) -> None:
        """Count ``event`` and, with a durable store, wait until it is written."""
        if self._count(event):
            if self.store is not None:
                await self.store.append(event)
            if self.shared is not None and self._also_shared:
                await self.shared.append(event)

    def record_nowait(self, event: UsageEvent) -> None:
        """Count ``event`` now; a durable store writes it in the background (callbacks, finalisers)."""
        if self._count(event):
            if self.store is not None:
                self.store.append_nowait(event)
            if self.shared is not None and self._also_shared:
                self.shared.append_nowait(event)

    def totals(self, by: str = "agent") -> dict[str, AgentUsage]:
        check_by(by)
        if self.shared is not None:
            found = self.shared.totals(by)
            if found is not None:
                return found
        return {k: AgentUsage(**asdict(v)) for k, v in self._totals[by].items()}

    def get(self, by: str, key: str | None) -> AgentUsage:
        check_by(by)
        if self.shared is not None:
            shared = self.shared.get(by, key)
            if shared is not None:
                return shared
        found = self._totals[by].get(key or NO_AGENT)
        return AgentUsage(**asdict(found)) if found else AgentUsage()

    def reset(self, agent_id: str | None = None) -> None:
        """Forget one agent's totals, or everything (the durable ledger is kept).

        With shared totals (Redis) the fleet-wide totals are reset too.
        """
        if self.shared is not None:
            self.shared.reset(agent_id)
        if agent_id is None:
            for group in self._totals.values():
                group.clear()
            self._events.clear()
        else:
            self._totals["agent"].pop(agent_id, None)

    def events(self) -> list[UsageEvent]:
        return list(self._events)

    def flush(self) -> None:
        """Write what the durable store has queued (outside an event loop)."""
        if self.store is not None:
            self.store.flush()

    async def close(self) -> None:
        """Write what is queued and close the durable store."""
        if self.store is not None:
            await self.store.close()


class UsageMethods:
    """The usage API of ``LLMRouter`` (contract C7), over its ``_ledger``."""

    _ledger: UsageLedger

    def usage_events(self) -> list[UsageEvent]:
        """The usage events this router recorded (the newest 100,000), oldest first."""
        return list(self._ledger.events())

    def get_agent_usage(self, agent_id: str | None) -> AgentUsage:
        """Totals for one agent (all zeros for an agent never seen)."""
        return self._ledger.get("agent", agent_id)

    def get_all_usage(self, by: str = "agent") -> dict[str, AgentUsage]:
        """Totals per agent (or per ``model``, ``backend``, ``thread``)."""
        return self._ledger.totals(check_by(by))

    def reset_agent_usage(self, agent_id: str | None = None) -> None:
        """Forget one agent's totals, or all totals; a durable ledger keeps its rows."""
        self._ledger.reset(agent_id)

    def export_usage_csv(self, path: str, by: str = "agent") -> int:
        """Write usage as CSV grouped ``by`` agent, model, backend, thread, or one row per ``event``."""
        if check_by(by, EXPORTS) == "event":
            return write_csv(path, by, events=self._ledger.events())
        return write_csv(path, by, totals=self._ledger.totals(by))


# ------------------------------------------------------------------ CSV

def _number(value: Any) -> Any:
    """Costs without float noise: 0.000225, not 0.00022500000000000002."""
    if isinstance(value, float):
        text = f"{value:.10f}".rstrip("0").rstrip(".")
        return text or "0"
    return "" if value is None else value


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_row(event: UsageEvent) -> list[Any]:
    row = [getattr(event, c) for c in EVENT_COLUMNS]
    row[0] = iso(event.timestamp)
    row[EVENT_COLUMNS.index("latency_ms")] = round(event.latency_ms, 3)
    return [_number(v) for v in row]


def group_events(events: Iterable[UsageEvent], by: str) -> dict[str, AgentUsage]:
    """Totals per key from a list of events (what the CLI does with a ledger)."""
    out: dict[str, AgentUsage] = {}
    column = GROUPS[check_by(by)]
    for event in events:
        key = getattr(event, column) or NO_AGENT
        out.setdefault(key, AgentUsage()).add(event)
    return out


def write_csv(path: str | os.PathLike[str], by: str, *, totals: dict[str, AgentUsage] | None = None,
              events: Iterable[UsageEvent] = ()) -> int:
    """Write a usage CSV (grouped totals, or one row per event); returns the number of rows."""
    check_by(by, EXPORTS)
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        if by == "event":
            out.writerow(EVENT_COLUMNS)
            for event in events:
                out.writerow(event_row(event))
                rows += 1
        else:
            out.writerow([GROUPS[by], *TOTAL_COLUMNS])
            for key in sorted(totals or {}):
                t = (totals or {})[key]
                out.writerow([key, *(_number(getattr(t, c)) for c in TOTAL_COLUMNS)])
                rows += 1
    return rows


def now() -> float:
    return time.time()
