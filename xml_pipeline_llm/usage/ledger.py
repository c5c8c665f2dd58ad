"""The ledger: exact in-memory totals, each call counted once, and the durable store it feeds."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .events import GROUPS, METADATA, NO_AGENT, AgentUsage, UsageEvent, check_by, group_events, group_key
from .listeners import Listeners

if TYPE_CHECKING:
    from ..state import SharedUsage


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
