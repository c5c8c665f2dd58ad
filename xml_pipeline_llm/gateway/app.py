"""The gateway's request handling, independent of the HTTP server that carries it.

``Gateway.handle(method, path, query, headers, body)`` answers one request
with a ``Reply`` (status, headers, and a body or an async iterator of SSE
events).  ``aiohttp_app`` serves it over HTTP (``xml-pipeline-llm serve``);
``inprocess.InProcessTransport`` serves the very same handling to an httpx
client with no socket (``openai_client()``), so both answer alike.

A request whose caller goes away is cancelled: ``complete()`` is cancelled
(slot, tokens and budget reservation given back by the router), and a stream
is closed, which charges what was received.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, RateLimitError
from ..snapshot import snapshot
from .auth import Identity, Keys
from .errors import HTTPError, bad_request, error_chunk, from_exception
from .reply import JSON, MB, SSE, Reply, error_reply, json_reply
from .translate import Call, ChunkWriter, completion, parse_body, to_call
from .ui import UI

if TYPE_CHECKING:
    from aiohttp import web

    from ..router import LLMRouter
    from ..streaming import LLMStream

log = logging.getLogger("xml_pipeline_llm.gateway")

class Gateway:
    """OpenAI's chat-completions API (and the gateway's own endpoints) over one router.

    ``router`` is called per request (the in-process client follows
    ``configure_router``); ``metrics`` renders Prometheus text (None: not
    available); ``draining`` answers new calls 503 while the server stops.
    """

    def __init__(self, router: Callable[[], LLMRouter], keys: Keys | None = None, *,
                 metrics: Callable[[], bytes] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.router = router
        self.keys = keys if keys is not None else Keys([])
        self.metrics = metrics
        self.draining = False
        self._clock = clock
        self._routes: dict[tuple[str, str], Callable[..., Any]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._models,
            ("GET", "/models"): self._models,
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/v1/usage"): self._usage,
            ("GET", "/v1/budgets"): self._budgets,
            ("GET", "/v1/snapshot"): self._snapshot,
        }
        self.ui = UI(self.keys, router)       # GET /ui: the live page (ui.py)

    @property
    def max_body(self) -> int:
        """The largest request body in bytes (``llm.gateway.max_body_mb``)."""
        return int(self.router().config.gateway.max_body_mb * MB)

    async def handle(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
                     body: bytes, identity: Identity | None = None) -> Reply:
        """Answer one request.  ``headers`` have lower-case names; ``identity`` replaces key lookup
        (the in-process client's own identity)."""
        rid = uuid.uuid4().hex
        try:
            handler = self._routes.get((method, path))
            if path == "/ui" or path.startswith("/ui/"):
                handler = functools.partial(self._ui, method, path)
            if handler is None and method == "GET" and path.startswith(("/v1/models/", "/models/")):
                handler = functools.partial(self._model, path.split("/models/", 1)[1])
            if handler is None:
                return self._not_found(method, path, rid)
            reply: Reply = await handler(rid, query, headers, body, identity)
        except HTTPError as err:
            reply = error_reply(err, rid)
        except Exception as exc:          # never a traceback in a body
            reply = error_reply(from_exception(exc, rid), rid)
        reply.headers["x-request-id"] = rid
        return reply

    def _not_found(self, method: str, path: str, rid: str) -> Reply:
        if any(p == path for _, p in self._routes):
            allowed = ", ".join(m for m, p in self._routes if p == path)
            return error_reply(HTTPError(405, f"{method} {path}: method not allowed; use {allowed}",
                                         "invalid_request_error", "method_not_allowed",
                                         headers={"Allow": allowed}), rid)
        return error_reply(HTTPError(404, f"{method} {path}: no such endpoint; the gateway serves "
                                          f"POST /v1/chat/completions, GET /v1/models, /v1/usage, /v1/budgets, "
                                          f"/v1/snapshot, /ui, /healthz, /readyz and /metrics", "invalid_request_error",
                                     "unknown_url"), rid)

    def _identify(self, headers: Mapping[str, str], identity: Identity | None) -> Identity:
        return identity if identity is not None else self.keys.identify(headers.get("authorization"))

    def _admin(self, headers: Mapping[str, str], identity: Identity | None) -> None:
        if identity is None:
            self.keys.admin(headers.get("authorization"))

    # ------------------------------------------------------------ chat completions

    async def _chat(self, rid: str, query: Mapping[str, str], headers: Mapping[str, str], raw: bytes,
                    identity: Identity | None) -> Reply:
        who = self._identify(headers, identity)
        if self.draining:
            raise HTTPError(503, "the gateway is shutting down; retry on another instance", "server_error",
                            "shutting_down", headers={"Retry-After": "1", "Connection": "close"})
        if len(raw) > self.max_body:
            raise too_large(self.max_body)
        call = to_call(parse_body(raw), headers, who)
        router = self.router()
        try:
            if call.stream:
                return await self._stream(rid, router, call)
            resp = await router.complete(call.model, call.messages, agent_id=call.agent_id,
                                         thread_id=call.thread_id, metadata=call.metadata, **call.kwargs)
        except BackendError as exc:
            raise await self._http_error(exc, rid, router, call) from None
        out = {**JSON, "x-xpl-backend": resp.backend, "x-xpl-attempts": str(resp.attempts)}
        if resp.cost_usd is not None:
            out["x-xpl-cost-usd"] = f"{resp.cost_usd:.10g}"
        if resp.cache_hit:              # answered by the response cache (llm.cache)
            out["x-xpl-cache"] = "hit"
        return Reply(200, out, json.dumps(completion(resp, rid)).encode())

    async def _http_error(self, exc: BackendError, rid: str, router: LLMRouter, call: Call) -> HTTPError:
        wait = None
        if isinstance(exc, RateLimitError):
            wait = await _cooldown(router, call.model)
        return from_exception(exc, rid, wait, self._clock())

    async def _stream(self, rid: str, router: LLMRouter, call: Call) -> Reply:
        """Open the stream (errors before the first content are HTTP errors), then SSE events."""
        stream = router.stream(call.model, call.messages, agent_id=call.agent_id, thread_id=call.thread_id,
                               metadata=call.metadata, **call.kwargs)
        first: Any = None
        try:
            first = await stream.next_chunk()
        except StopAsyncIteration:
            pass
        except BaseException:
            await stream.aclose()
            raise
        headers = {**SSE, "x-xpl-backend": stream.backend, "x-xpl-attempts": str(stream.attempts)}
        if stream.response is not None and stream.response.cache_hit:     # a replayed cached answer
            headers["x-xpl-cache"] = "hit"
        return Reply(200, headers, stream=_events(stream, first, ChunkWriter(rid, call.model), call, rid))

    # ------------------------------------------------------------ the rest

    async def _models(self, rid: str, query: Mapping[str, str], headers: Mapping[str, str], raw: bytes,
                      identity: Identity | None) -> Reply:
        who = self._identify(headers, identity)
        return json_reply(200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": owner}
            for name, owner in model_list(self.router()).items() if who.allows(name)]}, {})

    async def _model(self, model: str, rid: str, query: Mapping[str, str], headers: Mapping[str, str],
                     raw: bytes, identity: Identity | None) -> Reply:
        """``GET /v1/models/{id}``: one model of the list, or 404."""
        who = self._identify(headers, identity)
        owner = model_list(self.router()).get(model)
        if owner is None or not who.allows(model):
            raise HTTPError(404, f"model {model!r} is not served here; GET /v1/models lists the models",
                            "invalid_request_error", "model_not_found", "model")
        return json_reply(200, {"id": model, "object": "model", "created": 0, "owned_by": owner}, {})

    async def _healthz(self, *_: Any) -> Reply:
        return json_reply(200, {"status": "ok"}, {})

    async def _readyz(self, *_: Any) -> Reply:
        if self.draining:
            return json_reply(503, {"status": "shutting down"}, {})
        try:
            problem = await asyncio.wait_for(self.router().shared_state_problem(), 2.0)   # with Redis: a PING
        except Exception as exc:                 # no config (ConfigError), or the PING took over 2 s
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if problem:
            return json_reply(503, {"status": "not ready", "reason": problem[:300]}, {})
        return json_reply(200, {"status": "ready"}, {})

    async def _metrics(self, rid: str, query: Mapping[str, str], headers: Mapping[str, str], raw: bytes,
                       identity: Identity | None) -> Reply:
        self._admin(headers, identity)
        if self.metrics is None:
            raise HTTPError(503, "metrics are not available: install the [otel] extra "
                                 "(pip install 'xml-pipeline-llm[otel]') and serve with xml-pipeline-llm serve",
                            "server_error", "metrics_unavailable")
        return Reply(200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}, self.metrics())

    async def _usage(self, rid: str, query: Mapping[str, str], headers: Mapping[str, str], raw: bytes,
                     identity: Identity | None) -> Reply:
        self._admin(headers, identity)
        by = query.get("by", "agent")
        try:
            totals = self.router().get_all_usage(by)
        except ValueError as exc:
            raise bad_request(f"by: {exc}", "by") from None
        return json_reply(200, {"by": by, "usage": {k: asdict(v) for k, v in totals.items()}}, {})

    async def _budgets(self, rid: str, query: Mapping[str, str], headers: Mapping[str, str], raw: bytes,
                       identity: Identity | None) -> Reply:
        self._admin(headers, identity)
        return json_reply(200, {"budgets": [asdict(b) for b in self.router().budgets()]}, {})

    async def _snapshot(self, rid: str, query: Mapping[str, str], headers: Mapping[str, str], raw: bytes,
                        identity: Identity | None) -> Reply:
        """``GET /v1/snapshot``: the router now (``snapshot.py``), for ``top --url`` and the page."""

        self._admin(headers, identity)
        snap = await snapshot(self.router(), source="gateway")
        return Reply(200, {**JSON, "Cache-Control": "no-store"}, snap.to_json().encode())

    async def _ui(self, method: str, path: str, rid: str, query: Mapping[str, str], headers: Mapping[str, str],
                  raw: bytes, identity: Identity | None) -> Reply:
        return await self.ui.handle(method, path, headers, raw, identity)


def too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body over {limit / MB:g} MB; send less, or raise llm.gateway.max_body_mb",
                     "invalid_request_error", "request_too_large")


async def _events(stream: LLMStream, first: Any, writer: ChunkWriter, call: Call, rid: str) -> AsyncIterator[bytes]:
    """The SSE events of an open stream; closing it early (the client went away) closes the stream."""
    try:
        chunk = first
        while chunk is not None:
            event = writer.event(chunk)
            if event is not None:
                yield event
            try:
                chunk = await stream.next_chunk()
            except StopAsyncIteration:
                chunk = None
        yield writer.last(stream.response, call.include_usage)
    except Exception as exc:              # broken after it started: an error event, as OpenAI sends
        yield error_chunk(from_exception(exc, rid))
    finally:
        await stream.aclose()


async def _cooldown(router: LLMRouter, model: str) -> float | None:
    """Seconds until a backend of ``model`` is out of cooldown (None: unknown or not cooling)."""
    try:
        _, backends = router.route(model)
        left = await router.cooldowns()
    except Exception:
        return None
    waits = [left.get(b.name, 0.0) for b in backends]
    return min(waits) if waits and min(waits) > 0 else None


def model_list(router: LLMRouter) -> dict[str, str]:
    """Model ids for ``GET /v1/models``: aliases, concrete ``supported_models``, concrete alias members."""
    out: dict[str, str] = {}
    for alias, members in router.config.models.items():
        out.setdefault(alias, "alias")
        for m in members:
            if not _pattern(m):
                out.setdefault(m, _owner(router, m))
    for b in router.backends:
        for m in b.models:
            if not _pattern(m):
                out.setdefault(m, b.name)
    return out


def _owner(router: LLMRouter, model: str) -> str:
    try:
        return router.route(model)[1][0].name
    except Exception:
        return "xml-pipeline-llm"


def _pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


# ------------------------------------------------------------------ aiohttp

def aiohttp_app(gateway: Gateway) -> web.Application:
    """An aiohttp application serving ``gateway`` (one catch-all route; the gateway dispatches)."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        limit = gateway.max_body
        if request.content_length is not None and request.content_length > limit:
            return _plain(error_reply(too_large(limit), uuid.uuid4().hex))
        try:
            body = await request.read() if request.body_exists else b""
        except web.HTTPRequestEntityTooLarge:
            return _plain(error_reply(too_large(limit), uuid.uuid4().hex))
        headers = {k.lower(): v for k, v in request.headers.items()}
        reply = await gateway.handle(request.method, request.path, request.query, headers, body)
        if reply.stream is None:
            return _plain(reply)
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        try:
            await resp.prepare(request)
            async for piece in reply.stream:
                await resp.write(piece)
        finally:
            await reply.stream.aclose()       # type: ignore[attr-defined]
        return resp

    app = web.Application(client_max_size=gateway.max_body)   # a chunked body over it: 413 above
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def _plain(reply: Reply) -> web.Response:
    from aiohttp import web

    return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
