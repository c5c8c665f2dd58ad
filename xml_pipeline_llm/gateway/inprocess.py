"""``openai_client()``: an ``openai.AsyncOpenAI`` served by the gateway's handling in this process.

    from xml_pipeline_llm import openai_client
    client = openai_client(agent_id="researcher")
    reply = await client.chat.completions.create(model="grok-4.1", messages=[...])

Its httpx transport hands each request to ``Gateway.handle`` (no socket, no
server), so it answers exactly what ``xml-pipeline-llm serve`` answers, over
the process-wide router (``get_router()``).  Calls are booked to the client's
agent, thread and metadata; naming another agent with ``X-Agent-Id`` is 403,
as under a fixed-agent key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from .. import get_router
from ..errors import ConfigError
from .app import Gateway
from .auth import ANY_AGENT, Identity

if TYPE_CHECKING:
    import openai

_GATEWAY: Gateway | None = None
BASE_URL = "http://xml-pipeline-llm.in-process/v1"


def gateway() -> Gateway:
    """The in-process gateway over the process-wide router (it follows ``configure_router``)."""
    global _GATEWAY
    if _GATEWAY is None:
        _GATEWAY = Gateway(get_router)
    return _GATEWAY


def http_module(openai: Any) -> Any:
    """The httpx the installed ``openai`` is built on (``httpx`` for 1.x/2.x, ``httpx2`` for 3.x)."""
    import importlib

    for cls in openai.DefaultAsyncHttpxClient.__mro__[1:]:
        if cls.__name__ == "AsyncClient":
            return importlib.import_module(cls.__module__.split(".")[0])
    import httpx

    return httpx


_TRANSPORTS: dict[str, Any] = {}


def transport_class(hx: Any) -> Any:
    """``InProcessTransport`` for the httpx module ``hx``: each request answered by ``Gateway.handle``."""
    found = _TRANSPORTS.get(hx.__name__)
    if found is not None:
        return found

    class Events(hx.AsyncByteStream):  # type: ignore[misc]
        """A reply's SSE events as a response body; closing it early closes the router's stream."""

        def __init__(self, events: AsyncIterator[bytes]) -> None:
            self._events = events

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for piece in self._events:
                yield piece

        async def aclose(self) -> None:
            await self._events.aclose()        # type: ignore[attr-defined]

    class InProcessTransport(hx.AsyncBaseTransport):  # type: ignore[misc]
        """An httpx transport whose requests are answered by ``Gateway.handle`` in this process."""

        def __init__(self, identity: Identity, thread_id: str | None = None, gw: Gateway | None = None) -> None:
            self.identity = identity
            self.thread_id = thread_id
            self._gateway = gw

        async def handle_async_request(self, request: Any) -> Any:
            body = await request.aread()
            headers = {k.lower(): v for k, v in request.headers.items()}
            if self.thread_id and "x-thread-id" not in headers:
                headers["x-thread-id"] = self.thread_id
            gw = self._gateway or gateway()
            reply = await gw.handle(request.method, request.url.path, dict(request.url.params), headers, body,
                                    identity=self.identity)
            if reply.stream is None:
                return hx.Response(reply.status, headers=reply.headers, content=reply.body, request=request)
            return hx.Response(reply.status, headers=reply.headers, stream=Events(reply.stream), request=request)

    _TRANSPORTS[hx.__name__] = InProcessTransport
    return InProcessTransport


def openai_client(agent_id: str | None = None, thread_id: str | None = None,
                  metadata: Mapping[str, Any] | None = None, **client_options: Any) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` whose calls go through the router in this process, as ``agent_id``.

    Anything that takes an OpenAI client works with it (the OpenAI Agents SDK's
    ``OpenAIChatCompletionsModel(model=..., openai_client=openai_client(agent_id="x"))``,
    PydanticAI's ``OpenAIProvider(openai_client=...)``).  The SDK's own retries
    are off (``max_retries=0``): the router's retry rules are the ones in force.
    ``client_options`` go to ``AsyncOpenAI`` (e.g. ``default_headers``).
    """
    try:
        import openai
    except ImportError:
        raise ConfigError("openai_client() needs the openai package: pip install 'xml-pipeline-llm[openai]'") from None
    identity = Identity(agent=agent_id or ANY_AGENT, metadata=dict(metadata or {}), name="in-process")
    client_options.setdefault("max_retries", 0)
    hx = http_module(openai)
    http = hx.AsyncClient(transport=transport_class(hx)(identity, thread_id), base_url=BASE_URL,
                          timeout=hx.Timeout(None))
    return openai.AsyncOpenAI(api_key="in-process", base_url=BASE_URL, http_client=http, **client_options)
