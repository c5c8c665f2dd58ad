"""The response cache at work: which calls it answers, single flight, hits, stored answers.

What it does is described in ``cache/__init__.py``; streams are in ``replay.py``, the stores in
``stores.py``; the ``llm.cache`` block is validated in ``config/``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..config.cache import CacheConfig, duration
from ..errors import ConfigError
from ..response import LLMResponse
from ..streaming import LLMStream
from ..usage import CACHE_HIT, make_event
from ..waiters import wake
from .replay import CachedStream
from .stores import Entry, MemoryStore, RedisStore, SqliteStore

if TYPE_CHECKING:
    from ..options import CallOptions
    from ..usage import UsageLedger
    from .stores import Store

log = logging.getLogger("xml_pipeline_llm")
T = TypeVar("T")

LOCK_MS = 6000          # the cross-process single-flight lock; renewed every third of it while the call runs
PROBE_SECONDS = 5.0     # a failed store is tried again after this long
_POLL_MIN, _POLL_MAX = 0.005, 0.1     # seconds between polls of a call waiting on another process
_OPTIONS_IN_KEY = ("fallbacks", "drop_params")   # package options that change what answers


def _canonical(value: Any) -> Any:
    """JSON for what ``json`` cannot write itself: pydantic models and classes (``response_format``)."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return {"$schema_of": value.__name__, "schema": value.model_json_schema()}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot key a {type(value).__name__}")


# ------------------------------------------------------------------ single flight in this process

class Flight:
    """The call answering one key now, and the calls (any loop, any thread) waiting for its answer."""

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[None]] = []
        self.entry: Entry | None = None
        self.over = False


class Guard:
    """A store's failures as misses: one WARNING when an outage starts, one line when it ends."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = False
        self.retry_at = 0.0
        self._lock = threading.Lock()

    def usable(self) -> bool:
        return not self.down or time.monotonic() >= self.retry_at

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            first, self.down = not self.down, True
            self.retry_at = time.monotonic() + PROBE_SECONDS
        if first:
            log.warning("response cache: the store %s failed (%s); calls go to the provider without the "
                        "cache until it works again (tried every %gs; no further warning for this outage)",
                        self.store.shown, _why(exc), PROBE_SECONDS)

    def ok(self) -> None:
        if self.down:
            with self._lock:
                was, self.down = self.down, False
            if was:
                log.warning("response cache: the store %s works again", self.store.shown)

    async def run(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        if not self.usable():
            return default
        try:
            result = await op()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(exc)
            return default
        self.ok()
        return result


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------ the cache

class ResponseCache:
    """``llm.cache`` of one router: which calls it answers, where entries live, the flights in the air."""

    def __init__(self, config: CacheConfig, ledger: UsageLedger, *, conn: Any = None, prefix: str = "xpl",
                 base: Path | None = None, providers: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.ttl = duration(config.ttl) or 3600.0
        self.scope = config.scope
        self.ledger = ledger
        self.providers = dict(providers or {})      # backend name -> provider name (for usage events)
        store: Store
        if config.store == "redis":
            if conn is None:
                raise ConfigError("llm.cache.store: redis keeps the cache on the shared_state server, and "
                                  "none is configured; set llm.shared_state, or use store: memory")
            store = RedisStore(conn, prefix)
        elif config.store.startswith("sqlite:///"):
            path = Path(config.store[len("sqlite:///"):])
            store = SqliteStore(path if path.is_absolute() or base is None else base / path)
        else:
            store = MemoryStore(config.max_entries)
        self.store = store
        self.guard = Guard(store)
        self._memory = store if isinstance(store, MemoryStore) else None
        self._redis = store if isinstance(store, RedisStore) else None
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ResponseCache(store={self.store.shown!r}, scope={self.scope!r}, ttl={self.ttl:g})"

    def plan(self, model: str, messages: list[dict[str, Any]], kwargs: Mapping[str, Any], agent_id: str | None,
             thread_id: str | None, metadata: Mapping[str, Any], options: CallOptions) -> Plan | None:
        """The cache's part in one call (None: this call does not use the cache)."""
        if options.cache is False:
            return None
        if options.cache is None and not (kwargs.get("temperature") == 0 or kwargs.get("seed") is not None):
            return None
        if self.scope == "global":
            scoped: Any = ""
        elif self.scope == "agent":
            scoped = agent_id
        elif self.scope == "thread":
            scoped = thread_id
        else:
            scoped = metadata.get(self.scope[len("metadata."):])
        if scoped is None:
            return None
        request = {"model": model, "messages": messages, "params": dict(kwargs),
                   "options": {name: getattr(options, name) for name in _OPTIONS_IN_KEY},
                   "scope": [self.scope, scoped]}
        try:
            text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=_canonical)
        except (TypeError, ValueError) as exc:
            log.debug("response cache: %s not cached (%s)", model, exc)
            return None
        return Plan(self, hashlib.sha256(text.encode()).hexdigest(), model, agent_id, thread_id, dict(metadata),
                    options.cache_ttl or self.ttl, options.cache_ttl)

    async def close(self) -> None:
        try:
            await self.store.close()
        except Exception:
            pass

    # ---------------------------------------------------------- finding an answer

    async def obtain(self, plan: Plan) -> Entry | bool:
        """A cached (or just answered) entry for ``plan``, or whether this call leads: True, it calls the
        provider and the calls with the same key wait for it; False, it calls the provider alone."""
        now = time.time()
        entry = await self._lookup(plan, now)
        if entry is not None:
            return entry
        loop = asyncio.get_running_loop()
        with self._lock:
            flight = self._flights.get(plan.key)
            if flight is None:
                if self._memory is not None:     # answered since the lookup: the key's flight landed
                    entry = self._memory.peek(plan.key, now)
                    if entry is not None and plan.fresh(entry, now):
                        return entry
                self._flights[plan.key] = plan.flight = Flight()
                waiter = None
            else:
                waiter = loop.create_future()
                flight.waiters.append(waiter)
        if waiter is not None:
            assert flight is not None
            try:
                await waiter
            except asyncio.CancelledError:
                with self._lock:
                    if waiter in flight.waiters:
                        flight.waiters.remove(waiter)
                raise
            return flight.entry if flight.entry is not None else False
        if self._redis is not None:
            try:
                found = await self._across_processes(plan)
            except BaseException:       # cancelled while waiting: the calls waiting on this one go on alone
                await asyncio.shield(self.answered(plan, None))
                raise
            if found is not None:
                self._land(plan, found)
                return found
        return True

    async def _lookup(self, plan: Plan, now: float) -> Entry | None:
        if self._memory is not None:
            entry = self._memory.peek(plan.key, now)
        else:
            entry = await self.guard.run(lambda: self.store.get(plan.key, now), None)
        return entry if entry is not None and plan.fresh(entry, now) else None

    async def _across_processes(self, plan: Plan) -> Entry | None:
        """With Redis: take the key's lock, or wait for the process holding it (its entry, or None when
        it gave up or died: this call then goes to the provider)."""
        redis = self._redis
        assert redis is not None
        got = await self.guard.run(lambda: redis.lock(plan.key, LOCK_MS), None)
        if got is None:
            return None                       # Redis away: on to the provider
        token, entry = got
        if token is not None:
            plan.token = token
            if entry is not None:
                await self.guard.run(lambda: redis.unlock(plan.key, token), None)
                plan.token = None
                return entry
            plan.renewing = asyncio.ensure_future(self._renew(plan))
            return None
        if entry is not None:
            return entry
        pause = _POLL_MIN
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)
            polled = await self.guard.run(lambda: redis.poll(plan.key), None)
            if polled is None:
                return None
            entry, held = polled
            if entry is not None or not held:
                return entry

    async def _renew(self, plan: Plan) -> None:
        redis = self._redis
        assert redis is not None
        while True:
            await asyncio.sleep(LOCK_MS / 3000)
            await self.guard.run(lambda: redis.renew(plan.key, LOCK_MS), None)

    # ---------------------------------------------------------- after the provider answered

    async def answered(self, plan: Plan, resp: LLMResponse | None) -> None:
        """Store a complete answer (not an error, not truncated) and hand it to the calls waiting for it;
        ``resp`` None: the call failed, and each waiting call goes to the provider itself."""
        entry = None
        if resp is not None and resp.finish_reason != "length" and not resp.cache_hit:
            entry = _entry(resp, self.providers.get(resp.backend, ""), time.time(), plan.ttl)
        if entry is not None and self._memory is not None:
            self._memory.keep(plan.key, entry)      # before the flight lands: no thread misses both
            entry_stored = True
        else:
            entry_stored = False
        self._land(plan, entry)         # the calls of this process waiting for it have it now
        if plan.renewing is not None:
            plan.renewing.cancel()
            plan.renewing = None
        try:
            if entry is not None and not entry_stored:
                stored = entry
                await self.guard.run(lambda: self.store.put(plan.key, stored, plan.ttl), None)
        finally:                        # other processes poll: the entry first, then the lock goes
            await self._release(plan)

    async def _release(self, plan: Plan) -> None:
        token, plan.token = plan.token, None
        if token is not None and self._redis is not None:
            redis = self._redis
            await self.guard.run(lambda: redis.unlock(plan.key, token), None)

    def _land(self, plan: Plan, entry: Entry | None) -> None:
        """End this call's flight: its waiters get ``entry`` (None: go to the provider yourselves)."""
        flight, plan.flight = plan.flight, None
        if flight is None:
            return
        with self._lock:
            if self._flights.get(plan.key) is flight:
                del self._flights[plan.key]
            flight.entry, flight.over = entry, True
            waiters, flight.waiters = flight.waiters, []
        for fut in waiters:
            wake(fut)

    def abandoned(self, plan: Plan) -> None:
        """A leading call that ended without an answer outside any loop (a dropped stream)."""
        if plan.renewing is not None:
            plan.renewing.cancel()
            plan.renewing = None
        self._land(plan, None)

    async def hit(self, plan: Plan, entry: Entry, started: float) -> LLMResponse:
        """The response for a hit, its ``cache_hit`` usage event recorded."""
        latency = (time.monotonic() - started) * 1000
        resp = LLMResponse(content=entry.content, model=entry.model, usage=dict(entry.usage),
                           finish_reason=entry.finish_reason, raw=None, backend=entry.backend, cost_usd=0.0,
                           latency_ms=latency, tool_calls=copy.deepcopy(entry.tool_calls), attempts=0,
                           cache_hit=True)
        await self.ledger.record(make_event(
            agent_id=plan.agent_id, thread_id=plan.thread_id, model=entry.model, backend=entry.backend,
            provider=entry.provider, usage=None, cost_usd=0.0, latency_ms=latency, outcome=CACHE_HIT,
            requested_model=plan.model, metadata=plan.metadata, saved_usd=entry.cost_usd))
        return resp


def _entry(resp: LLMResponse, provider: str, now: float, ttl: float) -> Entry:
    return Entry(content=resp.content, model=resp.model, usage=dict(resp.usage), finish_reason=resp.finish_reason,
                 backend=resp.backend, provider=provider, cost_usd=resp.cost_usd,
                 tool_calls=copy.deepcopy(resp.tool_calls), stored_at=now, expires_at=now + ttl)


@dataclass(eq=False)
class Plan:
    """The cache's part in one call: its key, and its flight while it leads one."""

    cache: ResponseCache
    key: str
    model: str
    agent_id: str | None
    thread_id: str | None
    metadata: dict[str, Any]
    ttl: float
    max_age: float | None           # cache_ttl=: no answer older than this
    flight: Flight | None = None
    token: str | None = None        # the Redis lock this call holds
    renewing: asyncio.Future[None] | None = field(default=None, repr=False)
    before: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)   # the guards' check, first

    def fresh(self, entry: Entry, now: float) -> bool:
        return self.max_age is None or now - entry.stored_at <= self.max_age

    async def complete(self, produce: Callable[[], Awaitable[LLMResponse]]) -> LLMResponse:
        """``complete()`` through the cache: a hit, the answer of an identical call in flight, or
        ``produce()`` (the provider), stored when it is a complete answer."""
        started = time.monotonic()
        if self.before is not None:
            await self.before()
        got = await self.cache.obtain(self)
        if not isinstance(got, bool):
            return await self.cache.hit(self, got, started)
        try:
            resp = await produce()
        except BaseException:
            if got:
                await asyncio.shield(self.cache.answered(self, None))
            raise
        await self.cache.answered(self, resp)
        return resp

    def stream(self, open_stream: Callable[[], LLMStream]) -> LLMStream:
        return CachedStream(self, open_stream)
