"""The retry policy: which errors are worth another try, how long to wait, when to stop.

``retrying(req, cooldowns)`` is tenacity's ``AsyncRetrying`` with the three
policy objects: ``retry`` on ``TryAgain`` (a try that another try may fix,
or a round that sent nothing),
``stop`` by the request's one stop rule (``Request.exhausted``: ``retries + 1``
provider calls, or no candidate left), and ``wait`` that pauses only while
every candidate of every model still serving the request cools down, until
the first cooldown ends (``until_ready``).  A failed backend cools down for the
provider's Retry-After or the jittered backoff (``cooldown``).

Errors are classified by the exception chain's classes first (a refused
connection, a timeout, an unsupported parameter: ``_litellm.cause``) and then
by HTTP status: LiteLLM maps a 502 to ``BadGatewayError``, a refused
connection to a 500, and malformed JSON to an ``APIError`` with status 200.
Message text is never looked at.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.stop import stop_base
from tenacity.wait import wait_base

if TYPE_CHECKING:
    from .backends import ResolvedBackend
    from .request import Request

Cooldowns = Callable[[Iterable[str]], Awaitable[dict[str, float]]]


class Action(Enum):
    RETRY = "retry"            # cool the backend down, try again (elsewhere first)
    NEXT_BACKEND = "next"      # this backend cannot serve it (401/403/404): drop it for this request
    UNSUPPORTED = "unsupported"  # its provider does not take a parameter (nothing sent): drop it, no try
    FATAL = "fatal"            # the request itself is wrong (400/422): raise at once


@dataclass(frozen=True)
class Verdict:
    action: Action
    kind: str                  # one of KINDS
    status: int | None
    retry_after: float | None = None

    @property
    def label(self) -> str:
        """How the ledger and the logs name this failure: ``429`` or ``timeout``."""
        if self.kind in _NAMED_BY_KIND or not self.status:
            return self.kind
        return str(self.status)


# The error kinds of an ``Attempt`` and of the ledger's outcomes (``retried:<label>``).
KINDS = ("rate_limit", "server_error", "timeout", "unreachable", "connection", "bad_response", "auth",
         "not_found", "bad_request", "context_window", "unsupported_params")
_NAMED_BY_KIND = frozenset({"timeout", "unreachable", "connection", "bad_response", "context_window",
                            "unsupported_params"})

# What an HTTP status means when nothing more specific is known.
_BY_STATUS: dict[int, tuple[Action, str]] = {
    400: (Action.FATAL, "bad_request"), 422: (Action.FATAL, "bad_request"),
    401: (Action.NEXT_BACKEND, "auth"), 403: (Action.NEXT_BACKEND, "auth"),
    404: (Action.NEXT_BACKEND, "not_found"),
    408: (Action.RETRY, "timeout"), 409: (Action.RETRY, "server_error"),
    425: (Action.RETRY, "server_error"), 429: (Action.RETRY, "rate_limit"),
}
# What the exception chain says (``_litellm.cause``) wins over the status LiteLLM put on it.
_BY_CAUSE: dict[str, tuple[Action, str]] = {
    "unsupported_params": (Action.UNSUPPORTED, "unsupported_params"),
    "context_window": (Action.FATAL, "context_window"),
    "timeout": (Action.RETRY, "timeout"),
    "unreachable": (Action.RETRY, "unreachable"),
    "connection": (Action.RETRY, "connection"),
    "bad_response": (Action.RETRY, "bad_response"),
}


def classify(exc: BaseException, cause: str | None) -> Verdict | None:
    """What a failed provider call means; None for an error that is not the provider's.

    ``cause`` is what the exception chain says (``_litellm.cause``); without
    one, the HTTP status decides: 5xx retry, 2xx is an unparseable answer, any
    other 4xx not listed is the request's fault.
    """
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    if cause is not None:
        action, kind = _BY_CAUSE[cause]
        return Verdict(action, kind, 408 if kind == "timeout" else status if action is Action.FATAL else None,
                       retry_after(exc))
    if status is None:
        return None
    action, kind = _BY_STATUS.get(status) or (
        (Action.RETRY, "server_error") if status >= 500 else
        (Action.RETRY, "bad_response") if status < 300 else (Action.FATAL, "bad_request"))
    return Verdict(action, kind, status, retry_after(exc) if action is Action.RETRY else None)


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
    return float(d / 2 + rand() * d / 2)


def cooldown(verdict: Verdict, k: int, base: float, cap: float) -> float:
    """How long a backend stays out after a retryable failure at try ``k``."""
    if verdict.retry_after is not None:
        return min(cap, verdict.retry_after)
    return backoff(k, base, cap)


def outcome(final: bool, verdict: Verdict) -> str:
    """The ledger's outcome for a failed try: ``error:<label>`` if it ended the request, else ``retried:<label>``."""
    return f"{'error' if final else 'retried'}:{verdict.label}"


class TryAgain(Exception):
    """The request loop goes round again (what tenacity retries on): a backend was dropped before
    anything was sent, a model was skipped, or every backend left cools down."""


class TryFailed(TryAgain):
    """A provider try failed in a way another try may fix."""


class stop_when_exhausted(stop_base):
    """tenacity stop: the request's own stop rule (``Request.exhausted``)."""

    def __init__(self, req: Request) -> None:
        self.req = req

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.req.exhausted()


def until_ready(cooling: Mapping[str, float], pool: Sequence[ResolvedBackend]) -> float:
    """Seconds until one of ``pool`` may take a try: 0 while one is not cooling down."""
    if any(b.name not in cooling for b in pool):
        return 0.0
    return min(cooling[b.name] for b in pool)


class wait_for_a_ready_backend:
    """tenacity wait: none while a candidate is ready, else until the earliest cooldown ends.

    A wait that would end after the request's deadline is refused at once
    (``DeadlineExceededError``) instead of being slept through; ``on_wait(req,
    seconds)`` hears of every wait (telemetry).
    """

    def __init__(self, req: Request, cooldowns: Cooldowns,
                 on_wait: Callable[[Request, float], None] | None = None) -> None:
        self.req = req
        self.cooldowns = cooldowns
        self.on_wait = on_wait

    async def __call__(self, retry_state: RetryCallState) -> float:
        req = self.req
        pool = req.remaining()       # every backend of every model left
        wait = until_ready(await self.cooldowns(b.name for b in pool), pool) if pool else 0.0
        if wait:
            if req.deadline.at is not None:
                req.deadline.refuse_if(wait, f"the cooldown of {', '.join(b.name for b in pool)}",
                                       req.name, req.attempts)
            if self.on_wait is not None:
                self.on_wait(req, wait)
        return wait


def retrying(req: Request, cooldowns: Cooldowns,
             on_wait: Callable[[Request, float], None] | None = None) -> AsyncRetrying:
    """The rounds of one request's loop, as tenacity runs them: again on ``TryAgain`` until
    ``Request.exhausted``, waiting only while every backend left cools down."""
    # AsyncRetrying awaits a coroutine ``wait`` (tenacity's annotation only names sync ones)
    wait = cast("wait_base", wait_for_a_ready_backend(req, cooldowns, on_wait))
    return AsyncRetrying(stop=stop_when_exhausted(req), wait=wait,
                         retry=retry_if_exception_type(TryAgain), reraise=True)
