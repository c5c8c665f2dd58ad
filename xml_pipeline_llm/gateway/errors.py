"""The package's exceptions as OpenAI error objects with the matching HTTP status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}

The official OpenAI SDKs turn the status into their own classes
(``openai.NotFoundError``, ``openai.RateLimitError``, ...).  A body never
holds a traceback: an exception the gateway does not know is logged here and
answered 500 with the request id only.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..budgets import BudgetExceededError
from ..errors import (
    BackendError,
    BadRequestError,
    BlockedError,
    CallLimitError,
    ConfigError,
    LoopDetectedError,
    ModelNotFoundError,
    NoBackendError,
    ProviderError,
    RateLimitError,
)

log = logging.getLogger("xml_pipeline_llm.gateway")


@dataclass
class HTTPError(Exception):
    """An answer other than 200, in OpenAI's error form."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> HTTPError:
    return HTTPError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str) -> HTTPError:
    return HTTPError(401, message, "invalid_request_error", "invalid_api_key",
                     headers={"WWW-Authenticate": 'Bearer realm="xml-pipeline-llm"'})


def forbidden(message: str, code: str = "permission_denied") -> HTTPError:
    return HTTPError(403, message, "permission_denied", code)


def retry_after(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1), or no header when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def from_exception(exc: BaseException, request_id: str, cooldown: float | None = None,
                   now: float | None = None) -> HTTPError:
    """The HTTP answer for what ``complete()``/``stream()`` raised.

    ``cooldown``: seconds until a backend of the model is out of cooldown (for a
    429 after the retries); ``now``: the UNIX time, for a budget's reset.
    """
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, BudgetExceededError):
        wait = None if exc.resets_at is None or now is None else exc.resets_at - now
        return HTTPError(429, str(exc), "budget_exceeded", "budget_exceeded", headers=retry_after(wait))
    if isinstance(exc, LoopDetectedError):
        return HTTPError(429, str(exc), "loop_detected", "loop_detected")
    if isinstance(exc, CallLimitError):
        return HTTPError(429, str(exc), "call_limit_exceeded", "call_limit_exceeded")
    if isinstance(exc, BlockedError):
        return forbidden(str(exc), "blocked")
    if isinstance(exc, TimeoutError) or (isinstance(exc, ProviderError) and _last_kind(exc) == "timeout"):
        return HTTPError(504, str(exc), "timeout", "timeout")
    if isinstance(exc, RateLimitError):
        wait = cooldown if cooldown else exc.retry_after
        return HTTPError(429, str(exc), "rate_limit_error", "rate_limit_exceeded", headers=retry_after(wait))
    if isinstance(exc, ModelNotFoundError):
        return HTTPError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, BadRequestError):
        return HTTPError(400, str(exc), "invalid_request_error", "bad_request")
    if isinstance(exc, NoBackendError):
        return HTTPError(502, str(exc), "upstream_error", "no_backend")
    if isinstance(exc, ProviderError):
        return HTTPError(502, str(exc), "upstream_error", "provider_error")
    if isinstance(exc, BackendError):
        return HTTPError(502, str(exc), "upstream_error", "backend_error")
    if isinstance(exc, ConfigError):          # the router's config: the message names the place and the fix
        return HTTPError(500, f"the gateway's configuration is wrong: {exc}", "server_error", "config_error")
    log.error("request %s: unexpected %s", request_id, type(exc).__name__, exc_info=exc)
    return HTTPError(500, f"internal error in the gateway (request {request_id}); see the gateway's log",
                     "server_error", "internal_error")


def _last_kind(exc: BackendError) -> str:
    return exc.attempts[-1].kind if exc.attempts else ""


def error_chunk(err: HTTPError) -> bytes:
    """An error met after a stream started: one SSE event with the error object (OpenAI does the same)."""
    return b"data: " + err.body() + b"\n\n"


def describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
