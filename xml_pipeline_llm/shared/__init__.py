"""Shared state in Redis: what ``shared_state: redis://...`` switches on.

``state.py``       RedisState and RedisGate: the state interface of ``MemoryState``, in Redis
``scripts.py``     the Lua scripts that keep buckets, slots, cooldowns and rotation atomic
``connection.py``  clients per event loop, batching, and falling back when Redis is away
``worker.py``      the background thread: lease renewal, late releases, usage writes
``usage.py``       the fleet's usage totals and newest events

Nothing here is imported unless a config asks for Redis.
"""
