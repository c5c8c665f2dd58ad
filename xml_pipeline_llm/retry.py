"""Which provider errors are worth another try, and how long a backend cools down.

Errors are classified by HTTP status, not by exception class: LiteLLM maps a
502 to ``BadGatewayError``, a refused connection to a 500, and malformed JSON
to an ``APIError`` with status 200 (contract C5).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any, Callable, Mapping


class Action(Enum):
    RETRY = "retry"            # cool the backend down, try again (elsewhere first)
    NEXT_BACKEND = "next"      # this backend cannot serve it (401/403/404): drop it for this request
    FATAL = "fatal"            # the request itself is wrong (400/422): raise at once


@dataclass(frozen=True)
class Verdict:
    action: Action
    kind: str                  # rate_limit, server_error, timeout, connection, bad_response, auth, ...
    status: int | None
    retry_after: float | None = None

    @property
    def label(self) -> str:
        """How the ledger and the logs name this failure: ``429`` or ``timeout``."""
        if self.kind in ("timeout", "connection", "bad_response") or not self.status:
            return self.kind
        return str(self.status)


_PROVIDER_MODULES = ("litellm", "openai", "httpx", "httpcore", "aiohttp", "anthropic", "json")


def classify(exc: BaseException) -> Verdict | None:
    """Decide what a failed provider call means; None for errors that are not the provider's."""
    status = getattr(exc, "status_code", None)
    names = {c.__name__ for c in type(exc).__mro__}
    if "EmptyStreamError" in names:
        return Verdict(Action.RETRY, "bad_response", None)
    if isinstance(exc, TimeoutError) or "Timeout" in names or "APITimeoutError" in names:
        return Verdict(Action.RETRY, "timeout", 408)
    if not isinstance(status, int):
        if type(exc).__module__.split(".")[0] in _PROVIDER_MODULES:
            return Verdict(Action.RETRY, "bad_response", None)
        return None
    if status in (400, 422):
        return Verdict(Action.FATAL, "bad_request", status)
    if status in (401, 403):
        return Verdict(Action.NEXT_BACKEND, "auth", status)
    if status == 404:
        return Verdict(Action.NEXT_BACKEND, "not_found", status)
    if status == 429:
        return Verdict(Action.RETRY, "rate_limit", status, retry_after(exc))
    if status == 408:
        return Verdict(Action.RETRY, "timeout", status)
    if status in (409, 425) or 500 <= status < 600:
        kind = "connection" if "APIConnectionError" in names or _refused(str(exc)) else "server_error"
        return Verdict(Action.RETRY, kind, status, retry_after(exc))
    if status < 300:
        return Verdict(Action.RETRY, "bad_response", status)
    return Verdict(Action.FATAL, "bad_request", status)


_CONNECTION_TEXTS = ("Connection error", "Cannot connect to host", "Connection refused")


def _refused(text: str) -> bool:
    """LiteLLM reports a refused connection as a plain 500; its text says what it was."""
    return any(t in text for t in _CONNECTION_TEXTS)


def _headers(exc: BaseException) -> Mapping[str, Any]:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    return headers or {}


def retry_after(exc: BaseException) -> float | None:
    """The provider's Retry-After in seconds: ``retry-after-ms``, delta-seconds or an HTTP-date."""
    headers = {str(k).lower(): str(v) for k, v in dict(_headers(exc)).items()}
    return parse_retry_after(headers.get("retry-after-ms"), headers.get("retry-after"))


def parse_retry_after(ms: str | None, value: str | None, now: float | None = None) -> float | None:
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff(k: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """The jittered delay after try ``k``: uniform in ``[d/2, d]`` with ``d = min(cap, base * 2**k)``."""
    d = min(cap, base * (2 ** min(k, 62)))
    return d / 2 + rand() * d / 2


def cooldown(verdict: Verdict, k: int, base: float, cap: float) -> float:
    """How long a backend stays out after a retryable failure at try ``k``."""
    if verdict.retry_after is not None:
        return min(cap, verdict.retry_after)
    return backoff(k, base, cap)
