"""The response cache: identical deterministic requests answered once, exactly accounted.

```yaml
llm:
  cache:
    store: memory          # memory | sqlite:///path/cache.db | redis (the shared_state server)
    ttl: 1h
    max_entries: 10000     # memory: least recently used go first
    scope: agent           # who shares entries: global | agent | thread | metadata.<key>
```

Exact match only: the key is the SHA-256 of the canonical request (the model
or alias as asked for, the messages and every provider parameter, keys
sorted) and the scope's value.  Only deterministic requests (``temperature``
0 or a ``seed``) are cached, unless the call passes ``cache=True``;
``cache=False`` neither reads nor writes.  A request without the scope's value
(no ``agent_id`` under ``scope: agent``) is not cached.  Errors and truncated
answers (``finish_reason: length``) are never stored.

A hit makes no provider call and takes no slot, tokens or budget: the
response has ``cache_hit`` True, ``cost_usd`` 0.0, ``attempts`` 0 and the
original ``usage``; its usage event has outcome ``cache_hit`` and ``saved_usd``.

Single flight: while a request is being answered, identical requests wait for
it instead of calling the provider (``Flight``, in this process: waiters are
woken on their own event loop, so threads with loops of their own share it;
with the Redis store also across processes: a lock key taken with SET NX PX,
renewed while the call runs, and the waiting calls poll the entry with backoff).
If the call they wait on fails, or its process dies, each goes to the provider.

A store that fails (Redis away, a damaged SQLite file) turns every lookup into
a miss and every write into nothing: one WARNING per outage, never an error.
"""
