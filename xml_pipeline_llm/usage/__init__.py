"""Token and cost accounting: one event per provider call, totals per agent/model/backend/thread.

The router records each call exactly once (de-duplicated by LiteLLM's call id,
so the LiteLLM callback and the router's own read-your-writes record cannot
both count it).  ``UsageLedger`` keeps exact totals in memory and, when asked,
appends every event to a durable store (``SqliteStore``) before the caller
gets its answer.

One module per job: ``events.py`` (the event, its builder, totals),
``listeners.py`` (``on_usage``), ``ledger.py`` (``UsageLedger``), ``export.py`` (CSV),
``methods.py`` (the router's usage API).
"""

from .events import (
    CACHE_HIT,
    COUNT_COLUMNS,
    EVENT_COLUMNS,
    EVENT_FIELDS,
    EXPORTS,
    GROUPS,
    METADATA,
    NO_AGENT,
    OK,
    TOTAL_COLUMNS,
    AgentUsage,
    MetadataValue,
    UsageEvent,
    check_by,
    group_events,
    group_key,
    make_event,
    metadata_from,
    metadata_json,
    plus,
)
from .export import (
    event_row,
    iso,
    key_column,
    write_csv,
)
from .ledger import (
    SharedUsageStore,
    UsageLedger,
    UsageStore,
)
from .listeners import (
    Listener,
    Listeners,
)
from .methods import (
    UsageMethods,
)

__all__ = [
    "AgentUsage",
    "CACHE_HIT",
    "COUNT_COLUMNS",
    "EVENT_COLUMNS",
    "EVENT_FIELDS",
    "EXPORTS",
    "GROUPS",
    "Listener",
    "Listeners",
    "METADATA",
    "MetadataValue",
    "NO_AGENT",
    "OK",
    "SharedUsageStore",
    "TOTAL_COLUMNS",
    "UsageEvent",
    "UsageLedger",
    "UsageMethods",
    "UsageStore",
    "check_by",
    "event_row",
    "group_events",
    "group_key",
    "iso",
    "key_column",
    "make_event",
    "metadata_from",
    "metadata_json",
    "plus",
    "write_csv",
]
