"""What the gateway answers: a status, headers and a body or a stream of server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .errors import HTTPError

JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MB = 1024 * 1024


class Reply:
    """One answer: status, headers and either ``body`` or ``stream`` (SSE events, closed with ``aclose``)."""

    __slots__ = ("status", "headers", "body", "stream")

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"",
                 stream: AsyncIterator[bytes] | None = None) -> None:
        self.status, self.headers, self.body, self.stream = status, headers, body, stream


def json_reply(status: int, value: Any, headers: dict[str, str]) -> Reply:
    return Reply(status, {**JSON, **headers}, json.dumps(value).encode())


def error_reply(err: HTTPError, request_id: str) -> Reply:
    return Reply(err.status, {**JSON, **err.headers, "x-request-id": request_id}, err.body())
