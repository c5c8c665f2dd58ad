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

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCOPES = ("global", "agent", "thread")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CacheConfig(BaseModel):
    """``llm.cache``: present means on."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    store: str = "memory"
    ttl: str | int | float = "1h"
    max_entries: int = Field(default=10_000, gt=0)
    scope: str = "agent"


EXPECTED = {
    "cache": "a mapping with store, ttl, max_entries, scope, such as {store: memory, ttl: 1h}",
    "cache.store": "memory, sqlite:///path/cache.db or redis (the shared_state server)",
    "cache.ttl": "a duration such as 90s, 10m, 1h or 1d (or a number of seconds)",
    "cache.max_entries": "a positive integer (the entries kept in memory; default 10000)",
    "cache.scope": "global, agent, thread or metadata.<key> (such as metadata.org_id)",
}


def duration(value: Any) -> float | None:
    """``90s``, ``10m``, ``1h``, ``1d`` or a number of seconds, as seconds (None when it is none of these)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(value))
    if not found:
        return None
    seconds = float(found.group(1)) * _UNITS[found.group(2)]
    return seconds if seconds > 0 else None


def cache_problems(c: CacheConfig | None, shared_state: str | None) -> list[str]:
    """What is wrong with ``llm.cache``, each with its fix."""
    if c is None:
        return []
    problems = []
    if not (c.store in ("memory", "redis") or (c.store.startswith("sqlite:///") and len(c.store) > 10)):
        problems.append(f'llm.cache.store: expected {EXPECTED["cache.store"]}, got "{c.store}"')
    if c.store == "redis" and not shared_state:
        problems.append("llm.cache.store: redis keeps the cache on the shared_state server, and none is "
                        "configured; set llm.shared_state: redis://host:port/db, or use store: memory")
    if duration(c.ttl) is None:
        problems.append(f"llm.cache.ttl: expected {EXPECTED['cache.ttl']}, got {json.dumps(c.ttl)}")
    if c.scope not in SCOPES and not (c.scope.startswith("metadata.") and c.scope[9:].strip()):
        problems.append(f'llm.cache.scope: expected {EXPECTED["cache.scope"]}, got "{c.scope}"')
    return problems
