"""Usage events and totals: one event per provider call (one builder), totals per agent, model,
backend, thread or metadata key, and the columns the stores and CSVs use."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

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
    ``cache_hits`` counts the requests the response cache answered and
    ``saved_usd`` what their original answers cost (priced ones); hits add
    nothing else, so tokens, ``request_count`` and ``cost_usd`` are provider calls.
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
    cache_hits: int = 0
    saved_usd: float = 0.0

    def merge(self, other: AgentUsage) -> None:
        """Add another key's totals (a footer row, totals across runs)."""
        for f in fields(self):
            setattr(self, f.name, plus(getattr(self, f.name), getattr(other, f.name)))

    def add(self, event: UsageEvent) -> None:
        if event.outcome == CACHE_HIT:      # answered by the response cache: no provider call
            self.cache_hits += 1
            self.saved_usd += event.saved_usd or 0.0
            return
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
CACHE_HIT = "cache_hit"   # a request the response cache answered (cache/): no provider call


@dataclass(frozen=True)
class UsageEvent:
    """One provider call.  ``outcome`` is ``ok``, ``retried:<kind>`` or ``error:<kind>``; a request the
    guards refused before sending is one event ``refused:<why>`` (no backend, no tokens).
    ``cache_hit`` is a request the response cache answered (zero tokens, ``cost_usd`` 0.0,
    ``saved_usd`` what the original answer cost, None when unpriced).

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
    saved_usd: float | None = None
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
               metadata: Mapping[str, MetadataValue] | None = None,
               saved_usd: float | None = None) -> UsageEvent:
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
                      reasoning_tokens=usage.get("reasoning_tokens", 0), saved_usd=saved_usd)


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
COUNT_COLUMNS = [c for c in TOTAL_COLUMNS if c not in ("cost_usd", "saved_usd")]   # the whole numbers among them


def group_events(events: Iterable[UsageEvent], by: str) -> dict[str, AgentUsage]:
    """Totals per key from a list of events (what the CLI does with a ledger)."""
    out: dict[str, AgentUsage] = {}
    check_by(by)
    for event in events:
        out.setdefault(group_key(event, by), AgentUsage()).add(event)
    return out
