"""Shared state in Redis: what ``shared_state: redis://...`` switches on.

``state.py``       RedisState: the state interface of ``MemoryState``, in Redis
``gate.py``        RedisGate: one backend's slots, token bucket and start window
``scripts.py``     the Lua scripts that keep buckets, slots, cooldowns and rotation atomic
``connection.py``  Conn: clients per event loop, and falling back when Redis is away
``loops.py``       one loop's client: batching into pipelines, a cluster's nodes
``health.py``      RedisDown, which errors mean "not reachable", Health
``budgets.py``     budgets for a fleet
``worker.py``      the background thread: lease renewal, late releases, usage writes
``usage.py``       the fleet's usage totals and newest events

Nothing here is imported unless a config asks for Redis.
"""
