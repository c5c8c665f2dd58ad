"""Token and cost accounting: one event per provider call, totals per agent/model/backend/thread.

The router records each call exactly once (de-duplicated by LiteLLM's call id,
so the LiteLLM callback and the router's own read-your-writes record cannot
both count it).  ``UsageLedger`` keeps exact totals in memory and, when asked,
appends every event to a durable store (``SqliteStore``) before the caller
gets its answer.
"""

from __future__ import annotations

import asyncio
import csv
import inspect
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .state import SharedUsage

log = logging.getLogger("xml_pipeline_llm")

NO_AGENT = "(none)"
GROUPS = {"agent": "agent_id", "model": "model", "backend": "backend", "thread": "thread_id"}
EXPORTS = (*GROUPS, "event")
METADATA = "metadata."          # by="metadata.<key>": totals per value of that metadata key
MetadataValue = str | int | float | bool


def check_by(by: str, valid: tuple[str, ...] = tuple(GROUPS)) -> str:
    """``by`` if it is one of ``valid`` or ``metadata.<key>``, else a ValueError listing them."""
    if by not in valid and not (isinstance(by, str) and by.startswith(METADATA) and len(by) > len(METADATA)):
        raise ValueError(f"by: expected one of {', '.join(valid)} or metadata.<key> (such as "
                         f"metadata.org_id), got {by!r}")
    return by


def group_key(event: UsageEvent, by: str) -> str:
    """The key ``event`` is counted under when grouping ``by`` (``(none)`` when it has none).

    A metadata value is its text for a string and its JSON otherwise (``true``, ``3``, ``1.5``),
    in memory and in Redis alike.
    """
    if by.startswith(METADATA):
        value = event.metadata.get(by[len(METADATA):])
        if value is None:
            return NO_AGENT
        return value if isinstance(value, str) else json.dumps(value)
    return getattr(event, GROUPS[by]) or NO_AGENT


@dataclass
class AgentUsage:
    """Totals for one key (an agent, a model, a backend or a thread).

    ``cost_usd`` sums the priced calls; it is None while none had a price (an
    unknown cost is never 0.0, which would claim "free").  ``unpriced_requests``
    counts the successful calls without a price, whose cost the sum leaves out.
    ``cached_tokens``, ``cache_write_tokens`` (parts of ``prompt_tokens``: read
    from and written to the provider's prompt cache) and ``reasoning_tokens``
    (part of ``completion_tokens``) sum what the providers reported.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    request_count: int = 0
    error_count: int = 0
    cost_usd: float | None = None
    unpriced_requests: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def merge(self, other: AgentUsage) -> None:
        """Add another key's totals (a footer row, totals across runs)."""
        for f in fields(self):
            setattr(self, f.name, plus(getattr(self, f.name), getattr(other, f.name)))

    def add(self, event: UsageEvent) -> None:
        self.prompt_tokens += event.prompt_tokens
        self.completion_tokens += event.completion_tokens
        self.total_tokens += event.total_tokens
        self.cached_tokens += event.cached_tokens
        self.cache_write_tokens += event.cache_write_tokens
        self.reasoning_tokens += event.reasoning_tokens
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
    """One provider call.  ``outcome`` is ``ok``, ``retried:<kind>`` or ``error:<kind>``; a request the
    guards refused before sending is one event ``refused:<why>`` (no backend, no tokens).

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
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    call_id: str = field(default="", compare=False)
    #: ``metadata=`` of the call (str keys; str/int/float/bool values), {} when none.  The last field:
    #: the ``metadata`` column of an event CSV is the last one.
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict, hash=False)

    @property
    def succeeded(self) -> bool:
        """The try served its request (a request counted in ``request_count``)."""
        return self.outcome == OK

    @property
    def ended_in_error(self) -> bool:
        """The try was the last of a request that failed, or the request was refused by a guard
        (``refused:loop``, ``refused:call_limit``, ``refused:blocked``): counted in ``error_count``."""
        return self.outcome.startswith(("error:", "refused:"))


def make_event(*, agent_id: str | None, thread_id: str | None, model: str, backend: str, provider: str,
               usage: Mapping[str, int] | None, cost_usd: float | None, latency_ms: float, outcome: str,
               call_id: str = "", requested_model: str | None = None,
               metadata: Mapping[str, MetadataValue] | None = None) -> UsageEvent:
    """The one way a usage event is made (by a try, and by LiteLLM's success callback)."""
    usage = usage or {}
    return UsageEvent(timestamp=time.time(), agent_id=agent_id or "", thread_id=thread_id or "",
                      model=model, backend=backend, provider=provider,
                      prompt_tokens=usage.get("prompt_tokens", 0),
                      completion_tokens=usage.get("completion_tokens", 0),
                      total_tokens=usage.get("total_tokens", 0), cost_usd=cost_usd,
                      latency_ms=latency_ms, outcome=outcome,
                      requested_model=model if requested_model is None else requested_model,
                      call_id=call_id, metadata=dict(metadata) if metadata else {},
                      cached_tokens=usage.get("cached_tokens", 0),
                      cache_write_tokens=usage.get("cache_write_tokens", 0),
                      reasoning_tokens=usage.get("reasoning_tokens", 0))


def metadata_json(metadata: Mapping[str, Any]) -> str:
    """``metadata`` as compact JSON with sorted keys ("" when empty): the CSV cell and the stored text."""
    return json.dumps(dict(metadata), sort_keys=True, separators=(",", ":")) if metadata else ""


def metadata_from(text: Any) -> dict[str, Any]:
    """Stored metadata text (or None from an old ledger) back as a dict."""
    if not text:
        return {}
    try:
        found = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


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


Listener = Callable[[UsageEvent], Any]
_REPORT_EVERY = 60.0    # seconds between log lines about one failing on_usage callback


@dataclass(eq=False)
class _Subscriber:
    callback: Listener
    loop: asyncio.AbstractEventLoop | None      # running where on_usage was called (async callbacks)
    reported_at: float = float("-inf")
    suppressed: int = 0


class Listeners:
    """``on_usage`` callbacks, called with every event once it is counted.

    A callback's exception (or its coroutine's) is contained: logged at most once a
    minute per callback and never seen by the call or the other callbacks.  A
    callback that returns an awaitable (a coroutine function) has it scheduled on
    the loop running where the event is recorded; an event recorded outside any
    loop (a stream garbage-collected in a plain thread) goes to the loop that was
    running where ``on_usage`` was called, if it still runs, else the callback
    skips it with a WARNING (at most once a minute).
    """

    def __init__(self) -> None:
        self._subs: tuple[_Subscriber, ...] = ()
        self._lock = threading.Lock()
        self._tasks: set[Any] = set()

    def __bool__(self) -> bool:
        return bool(self._subs)

    def add(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event)`` for every event from now on; returns a function that stops it."""
        if not callable(callback):
            raise TypeError(f"on_usage: expected a function taking a UsageEvent, got {type(callback).__name__}")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        sub = _Subscriber(callback, loop)
        with self._lock:
            self._subs = (*self._subs, sub)

        def unsubscribe() -> None:
            with self._lock:
                self._subs = tuple(s for s in self._subs if s is not sub)

        return unsubscribe

    def notify(self, event: UsageEvent) -> None:
        for sub in self._subs:
            try:
                result = sub.callback(event)
                if inspect.isawaitable(result):
                    self._schedule(sub, result)
            except Exception as exc:
                self._report(sub, exc)

    def _schedule(self, sub: _Subscriber, awaitable: Any) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            task = asyncio.ensure_future(awaitable)
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._done(sub, t))
        elif sub.loop is not None and sub.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(awaitable, sub.loop)
            fut.add_done_callback(lambda f: self._done(sub, f))
        else:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            self._report(sub, None)

    def _done(self, sub: _Subscriber, fut: Any) -> None:
        self._tasks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            self._report(sub, fut.exception())

    def _report(self, sub: _Subscriber, exc: BaseException | None) -> None:
        now = time.monotonic()
        if now - sub.reported_at < _REPORT_EVERY:
            sub.suppressed += 1
            return
        sub.reported_at, suppressed, sub.suppressed = now, sub.suppressed, 0
        name = getattr(sub.callback, "__qualname__", None) or repr(sub.callback)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        if exc is None:
            log.warning("on_usage callback %s: an event was recorded outside any running event loop and "
                        "the loop it was registered on is gone, so this coroutine callback skipped it%s; "
                        "register a plain function to see every event", name, more)
            return
        log.error("on_usage callback %s raised %s: %s%s; the call and the other callbacks are not affected "
                  "(logged at most once a minute)", name, type(exc).__name__, exc, more,
                  exc_info=(type(exc), exc, exc.__traceback__))


class UsageLedger:
    """Exact totals per agent, model, backend and thread (and declared metadata keys), plus recent events.

    Totals cost memory per key, not per call.  The in-memory event log keeps
    the newest ``max_events`` events (for ``by="event"`` exports); the SQLite
    store keeps them all.  ``group_by_metadata`` names the metadata keys whose
    totals are kept exactly (``by="metadata.<key>"``); totals by any other
    metadata key are computed from the event log (this process's newest events).
    """

    def __init__(self, store: UsageStore | None = None, max_events: int = 100_000,
                 shared: SharedUsage | None = None, group_by_metadata: Iterable[str] = ()) -> None:
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
        self.metadata_groups = tuple(dict.fromkeys(f"{METADATA}{k}" for k in group_by_metadata))
        for place in (store, shared):
            declare = getattr(place, "declare_groups", None)
            if declare is not None:
                declare(self.metadata_groups)
        self._totals: dict[str, dict[str, AgentUsage]] = {g: {} for g in (*GROUPS, *self.metadata_groups)}
        self._events: deque[UsageEvent] = deque(maxlen=max_events)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.listeners = Listeners()

    def counted(self, call_id: str) -> bool:
        """Whether the call with this id was counted already (its later events add nothing)."""
        return bool(call_id) and call_id in self._seen

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
            self._add(group, getattr(event, column) or NO_AGENT, event)
        for group in self.metadata_groups:
            self._add(group, group_key(event, group), event)
        return True

    def _add(self, group: str, key: str, event: UsageEvent) -> None:
        totals = self._totals[group].get(key)
        if totals is None:
            totals = self._totals[group][key] = AgentUsage()
        totals.add(event)

    async def record(self, event: UsageEvent) -> None:
        """Count ``event`` and, with a durable store, wait until it is written; then tell the listeners."""
        if self._count(event):
            if self.store is not None:
                await self.store.append(event)
            if self.shared is not None and self._also_shared:
                await self.shared.append(event)
            if self.listeners:
                self.listeners.notify(event)

    def record_nowait(self, event: UsageEvent) -> None:
        """Count ``event`` now; a durable store writes it in the background (callbacks, finalisers)."""
        if self._count(event):
            if self.store is not None:
                self.store.append_nowait(event)
            if self.shared is not None and self._also_shared:
                self.shared.append_nowait(event)
            if self.listeners:
                self.listeners.notify(event)

    def totals(self, by: str = "agent") -> dict[str, AgentUsage]:
        check_by(by)
        if by not in self._totals:        # an undeclared metadata key: from the recent events
            return group_events(self.events(), by)
        if self.shared is not None:
            found = self.shared.totals(by)
            if found is not None:
                return found
        with self._lock:
            return {k: AgentUsage(**asdict(v)) for k, v in self._totals[by].items()}

    def get(self, by: str, key: str | None) -> AgentUsage:
        check_by(by)
        if by not in self._totals:
            return group_events(self.events(), by).get(key or NO_AGENT) or AgentUsage()
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
        with self._lock:
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
    """The usage API of ``LLMRouter``, over its ``_ledger``."""

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
    row[EVENT_COLUMNS.index("metadata")] = metadata_json(event.metadata)
    return [_number(v) for v in row]


def group_events(events: Iterable[UsageEvent], by: str) -> dict[str, AgentUsage]:
    """Totals per key from a list of events (what the CLI does with a ledger)."""
    out: dict[str, AgentUsage] = {}
    check_by(by)
    for event in events:
        out.setdefault(group_key(event, by), AgentUsage()).add(event)
    return out


def key_column(by: str) -> str:
    """The key column of a grouped CSV: ``agent_id``, ``model``, ... or ``metadata.<key>``."""
    return by if by.startswith(METADATA) else GROUPS[by]


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
            out.writerow([key_column(by), *TOTAL_COLUMNS])
            for key in sorted(totals or {}):
                t = (totals or {})[key]
                out.writerow([key, *(_number(getattr(t, c)) for c in TOTAL_COLUMNS)])
                rows += 1
    return rows

