"""The schema of ``llm.cache`` (the response cache, ``cache/``) and what is wrong with it."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CACHE_SCOPES = ("global", "agent", "thread")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

EXPECTED = {
    "cache": "a mapping with store, ttl, max_entries, scope, such as {store: memory, ttl: 1h}",
    "cache.store": "memory, sqlite:///path/cache.db or redis (the shared_state server)",
    "cache.ttl": "a duration such as 90s, 10m, 1h or 1d (or a number of seconds)",
    "cache.max_entries": "a positive integer (the entries kept in memory; default 10000)",
    "cache.scope": "global, agent, thread or metadata.<key> (such as metadata.org_id)",
}


class CacheConfig(BaseModel):
    """``llm.cache``: present means on."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    store: str = "memory"
    ttl: str | int | float = "1h"
    max_entries: int = Field(default=10_000, gt=0)
    scope: str = "agent"


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


def cache_place(loc: list[Any]) -> tuple[str, str]:
    """``llm.cache.ttl`` and its EXPECTED entry (``cache.ttl``)."""
    return "llm" + "".join(f".{p}" for p in loc), "cache" if len(loc) == 1 else f"cache.{loc[-1]}"


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
    if c.scope not in CACHE_SCOPES and not (c.scope.startswith("metadata.") and c.scope[9:].strip()):
        problems.append(f'llm.cache.scope: expected {EXPECTED["cache.scope"]}, got "{c.scope}"')
    return problems
