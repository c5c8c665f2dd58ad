"""Pacing by the quota the provider reports on every answer.

OpenAI and xAI send ``x-ratelimit-remaining-requests|tokens`` with
``x-ratelimit-reset-requests|tokens``: the time until the quota is whole
again, as a Go duration (``6m0s``, ``1m30.5s``, ``20ms``, ``1.5s``).
Anthropic sends ``anthropic-ratelimit-requests|tokens|input-tokens|output-tokens-remaining``
with ``-reset``: the RFC 3339 time at which it is whole again.  Both come on
successful answers, on a stream before its first chunk, and on a 429.

``read(headers)`` turns them into a ``Reading``; ``Pacer.answered`` hands a
reading to the backend's gate (``limits.Gate.pace`` in memory, the Redis gate
fleet-wide), which holds the backend's calls to what is left until the reset
(never above its configured ``rate_limit_tpm``/``rate_limit_rpm``, which still
apply; a newer reading can only lower what is left; after the reset the
configured limits, or none, apply until the next reading).  Anthropic's
separate input and output token quotas are held as one: the lowest of the
token figures it sends.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

log = logging.getLogger("xml_pipeline_llm")

_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration such as ``6m0s``, ``1m30.5s``, ``20ms``, ``1.5s`` or ``2h0m0s``
    (a bare number is seconds); None when it is not one."""
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return total if pos == len(text) else None


def parse_time(text: str, now: float | None = None) -> float | None:
    """Seconds from now until an RFC 3339 time such as ``2026-12-06T08:01:30Z`` (0 when past);
    None when it is not one."""
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_reset(text: str, now: float | None = None) -> float | None:
    """Seconds until a reset given either way: a duration (OpenAI, xAI) or an RFC 3339 time (Anthropic)."""
    seconds = parse_duration(text)
    return seconds if seconds is not None else parse_time(text, now)


@dataclass(frozen=True)
class Reading:
    """What one answer said is left: (units, seconds until the reset) for tokens and for requests."""

    tokens: tuple[float, float] | None = None
    requests: tuple[float, float] | None = None

    def __bool__(self) -> bool:
        return self.tokens is not None or self.requests is not None


def _figure(headers: Mapping[str, str], remaining: str, reset: str,
            now: float | None) -> tuple[float, float] | None:
    left, when = headers.get(remaining), headers.get(reset)
    if left is None or when is None:
        return None
    try:
        units = float(left)
    except ValueError:
        return None
    seconds = parse_reset(when, now)
    if seconds is None or units != units:     # unparseable reset, NaN
        return None
    return max(0.0, units), seconds


def read(headers: Mapping[str, str], now: float | None = None) -> Reading:
    """The quota in a provider's headers (lower-case names); an empty ``Reading`` when there is none."""
    requests = _figure(headers, "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", now)
    tokens = _figure(headers, "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", now)
    if requests is None:
        requests = _figure(headers, "anthropic-ratelimit-requests-remaining",
                           "anthropic-ratelimit-requests-reset", now)
    if tokens is None:
        figures = [f for f in (_figure(headers, f"anthropic-ratelimit-{kind}-remaining",
                                       f"anthropic-ratelimit-{kind}-reset", now)
                               for kind in ("tokens", "input-tokens", "output-tokens")) if f is not None]
        tokens = min(figures) if figures else None
    return Reading(tokens, requests)


class Pacer:
    """Hands each answer's quota reading to its backend's gate (``Gate.pace``)."""

    def __init__(self, gates: Mapping[str, Any]) -> None:
        self.gates = gates

    def answered(self, backend: str, headers: Mapping[str, str], seq: int = 0) -> Reading:
        """Pace ``backend`` by the quota in ``headers``, the answer to its call number ``seq``."""
        reading = read(headers) if headers else Reading()
        if reading:
            gate = self.gates.get(backend)
            pace = getattr(gate, "pace", None)
            if pace is not None:
                pace(reading.tokens, reading.requests, seq)
                log.debug("%s: provider says %s tokens and %s requests are left", backend,
                          reading.tokens, reading.requests)
        return reading
