"""A provider's rate-limit quota, enforced and reported as the real providers do.

``Simulator.set_quota(backend, requests=..., tokens=..., window=60, neighbour=0.3)``
gives a backend a quota of ``requests`` calls and ``tokens`` tokens (prompt
plus completion, counted when the answer is made) per ``window`` seconds,
fixed windows starting when it is set.  Every answer reports what is left in
the provider's headers: OpenAI/xAI ``x-ratelimit-limit|remaining|reset-requests|tokens``
(the reset as a duration until the quota is whole again, ``1m30.5s``) and
Anthropic ``anthropic-ratelimit-requests|tokens|input-tokens|output-tokens-limit|remaining|reset``
(the reset as the RFC 3339 time at which it is).  A call over the quota is
answered 429 with the same headers and ``retry-after``.

``neighbour`` is the share of each window's quota another program uses,
spread evenly over the window (what it can get: it never goes over the
quota either).  ``QuotaStats`` says, per finished window, what the
backend's callers got, what the neighbour got and how many calls were
answered 429, so a test or benchmark can compare the quota used with the
quota the neighbour left.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone


@dataclass
class WindowStats:
    """One window of a backend's quota: what was served, to its callers and to the neighbour."""

    requests: int = 0
    tokens: int = 0
    limited: int = 0                # calls answered 429
    neighbour_requests: float = 0.0
    neighbour_tokens: float = 0.0


@dataclass
class QuotaStats:
    """A backend's quota so far: its settings, the finished windows and the current one."""

    requests: int | None
    tokens: int | None
    window: float
    neighbour: float
    done: list[WindowStats] = field(default_factory=list)
    current: WindowStats = field(default_factory=WindowStats)

    @property
    def windows(self) -> list[WindowStats]:
        return [*self.done, self.current]


class Quota:
    """One backend's quota (the registry's lock is held around every call)."""

    def __init__(self, requests: int | None, tokens: int | None, window: float, neighbour: float) -> None:
        if requests is None and tokens is None:
            raise ValueError("a quota needs requests or tokens (per window)")
        if window <= 0:
            raise ValueError(f"window must be a positive number of seconds, got {window}")
        if not 0.0 <= neighbour < 1.0:
            raise ValueError(f"neighbour is a share of the quota within [0, 1), got {neighbour}")
        self.requests, self.tokens, self.window, self.neighbour = requests, tokens, float(window), neighbour
        self.start = self.last = time.monotonic()
        self.index = 0
        self.done: list[WindowStats] = []
        self.cur = WindowStats()

    def _advance(self, now: float) -> None:
        """Close the windows that ended; let the neighbour take its share up to ``now``."""
        while now >= self.start + (self.index + 1) * self.window:
            end = self.start + (self.index + 1) * self.window
            self._neighbour(end)
            self.done.append(self.cur)
            self.cur = WindowStats()
            self.index += 1
            self.last = end
        self._neighbour(now)

    def _neighbour(self, now: float) -> None:
        dt = max(0.0, now - self.last) / self.window
        self.last = now
        if not self.neighbour:
            return
        c = self.cur
        if self.requests is not None:
            c.neighbour_requests += min(self.neighbour * self.requests * dt,
                                        max(0.0, self.requests - c.requests - c.neighbour_requests))
        if self.tokens is not None:
            c.neighbour_tokens += min(self.neighbour * self.tokens * dt,
                                      max(0.0, self.tokens - c.tokens - c.neighbour_tokens))

    def _left(self) -> tuple[float | None, float | None]:
        c = self.cur
        req = None if self.requests is None else self.requests - c.requests - c.neighbour_requests
        tok = None if self.tokens is None else self.tokens - c.tokens - c.neighbour_tokens
        return req, tok

    def charge(self, tokens: int, fmt: str) -> tuple[bool, dict[str, str]]:
        """Count a call of ``tokens`` if the quota has room: (allowed, the headers to answer with)."""
        now = time.monotonic()
        self._advance(now)
        req, tok = self._left()
        ok = (req is None or req >= 1) and (tok is None or tok >= tokens)
        if ok:
            self.cur.requests += 1
            self.cur.tokens += tokens
        else:
            self.cur.limited += 1
        reset = self.start + (self.index + 1) * self.window - now
        headers = self._headers(fmt, reset)
        if not ok:
            headers["retry-after"] = f"{max(0.001, reset):.3f}"
        return ok, headers

    def _headers(self, fmt: str, reset: float) -> dict[str, str]:
        req, tok = self._left()
        out: dict[str, str] = {}
        if fmt == "anthropic":
            at = datetime.now(timezone.utc) + timedelta(seconds=reset)
            stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            figures = [("requests", self.requests, req), ("tokens", self.tokens, tok),
                       ("input-tokens", self.tokens, tok), ("output-tokens", self.tokens, tok)]
            for kind, limit, left in figures:
                if limit is not None and left is not None:
                    out[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
                    out[f"anthropic-ratelimit-{kind}-remaining"] = str(max(0, math.floor(left)))
                    out[f"anthropic-ratelimit-{kind}-reset"] = stamp
            return out
        for kind, limit, left in (("requests", self.requests, req), ("tokens", self.tokens, tok)):
            if limit is not None and left is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(left)))
                out[f"x-ratelimit-reset-{kind}"] = go_duration(reset)
        return out

    def stats(self) -> QuotaStats:
        self._advance(time.monotonic())
        return QuotaStats(self.requests, self.tokens, self.window, self.neighbour,
                          [WindowStats(**vars(w)) for w in self.done], WindowStats(**vars(self.cur)))


def go_duration(seconds: float) -> str:
    """``seconds`` as OpenAI writes a reset: ``6m0s``, ``1m30.5s``, ``1.5s``, ``20ms``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes >= 60:
        hours, minutes = divmod(minutes, 60)
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text
