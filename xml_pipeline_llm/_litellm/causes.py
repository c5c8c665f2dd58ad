"""Why a call failed, by LiteLLM's (and its HTTP stack's) exception classes."""

from __future__ import annotations

from ..errors import EmptyStreamError
from .load import load

_CAUSES: list[tuple[tuple[type[BaseException], ...], str]] = []


def _cause_table() -> list[tuple[tuple[type[BaseException], ...], str]]:
    """Exception classes by what they mean, most specific first (resolved once)."""
    if not _CAUSES:
        import json
        import socket

        import aiohttp
        import httpx
        import openai

        lt = load()
        _CAUSES.extend([
            ((lt.UnsupportedParamsError,), "unsupported_params"),
            ((lt.ContextWindowExceededError,), "context_window"),
            ((lt.Timeout, openai.APITimeoutError, httpx.TimeoutException, TimeoutError,
              aiohttp.ServerTimeoutError), "timeout"),
            ((httpx.ConnectError, aiohttp.ClientConnectorError, ConnectionRefusedError, socket.gaierror),
             "unreachable"),
            ((httpx.TransportError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
              ConnectionError, openai.APIConnectionError), "connection"),
            ((json.JSONDecodeError, EmptyStreamError, openai.APIResponseValidationError), "bad_response"),
        ])
    return _CAUSES


def cause(exc: BaseException) -> str | None:
    """What the exception and the errors it was raised from say, beyond an HTTP status.

    ``unsupported_params``, ``context_window``, ``timeout``, ``unreachable``
    (connection refused, DNS failure), ``connection`` (dropped or broken) or
    ``bad_response`` (unparseable); None when the chain says nothing more.
    """
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(chain) < 8 and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for classes, what in _cause_table():
        if any(isinstance(e, classes) for e in chain):
            return what
    return None


def unsupported_params(exc: BaseException) -> str:
    """The parameters an ``UnsupportedParamsError`` names, as ``['seed']`` (for messages only)."""
    text = str(exc)
    start, end = text.find("parameters: ["), text.find("]")
    return text[start + len("parameters: "):end + 1] if 0 <= start < end else "a parameter"
