"""The aiohttp application: routing by backend prefix, auth, faults, latency.

One port serves any number of named backends (``/b/<name>/...``); paths
without the prefix belong to the backend ``default``. Only the generation
endpoints (chat completions, messages, api/chat) are counted in statistics
and receive scripted faults; model listings and ``/api/show`` just answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from . import formats
from .quota import Quota, QuotaStats
from .state import BackendStats, Fault, Plan, RecordedRequest, Registry, UsageDetails

DEFAULT_BACKEND = "default"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_GENERATION = (("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"), ("/api/chat", "ollama"))


class Simulator:
    """Local HTTP server speaking OpenAI/xAI, Anthropic and Ollama wire formats.

    Scripting and statistics methods are synchronous and thread-safe, so a
    test can call them while the server runs on another thread's loop.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._registry = Registry()
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ----

    async def start(self) -> Simulator:
        """Bind and start serving; ``port=0`` picks a free port (see ``.port``)."""
        runner = web.AppRunner(self._make_app(), handler_cancellation=True, shutdown_timeout=0.5,
                               access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Close the listener and cancel handlers still running (e.g. timeout faults)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:40123``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def base_url(self, backend: str = DEFAULT_BACKEND, fmt: str = "openai") -> str:
        """The ``api_base`` to hand LiteLLM for this backend and provider format."""
        root = f"{self.url}/b/{backend}"
        if fmt in ("openai", "xai"):
            return f"{root}/v1"
        if fmt in ("anthropic", "ollama"):
            return root
        raise ValueError(f"unknown provider format {fmt!r}; use openai, xai, anthropic or ollama")

    # ---- scripting and statistics (thread-safe) ----

    def script(self, backend: str, faults: list[Fault]) -> None:
        """Queue faults, one per upcoming request in arrival order; then requests succeed."""
        self._registry.script(backend, faults)

    def set_fault_rate(self, backend: str, rate: float, faults: list[Fault], seed: int | None = None) -> None:
        """Inject one of ``faults`` at random into ``rate`` of requests (``"*"``: every backend)."""
        self._registry.set_fault_rate(backend, rate, faults, seed)

    def set_latency(self, backend: str, seconds: float, per_chunk: float = 0.0) -> None:
        """Delay every answer by ``seconds`` and each stream chunk by ``per_chunk`` (``"*"``: all)."""
        self._registry.set_latency(backend, seconds, per_chunk)

    def require_key(self, backend: str, key: str | None) -> None:
        """Answer 401 unless ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` is sent."""
        self._registry.require_key(backend, key)

    def set_usage_details(self, backend: str, cached: float = 0.0, cache_write: float = 0.0,
                          reasoning_tokens: int = 0) -> None:
        """Report prompt-cache and reasoning tokens in the usage (``"*"``: every backend without its own).

        ``cached`` and ``cache_write`` are shares of each prompt read from and
        written to the provider's prompt cache, ``reasoning_tokens`` are added to
        each answer's completion as reasoning, each in the provider's own shape:
        OpenAI/xAI ``prompt_tokens_details.cached_tokens`` and
        ``completion_tokens_details.reasoning_tokens`` (no cache writes);
        Anthropic ``cache_read_input_tokens`` and ``cache_creation_input_tokens``
        (``input_tokens`` then counts the rest; no reasoning count), in
        ``message_start`` and, cumulative, in ``message_delta``; Ollama none.
        """
        self._registry.set_usage_details(backend, UsageDetails(cached, cache_write, reasoning_tokens))

    def set_quota(self, backend: str, requests: int | None = None, tokens: int | None = None,
                  window: float = 60.0, neighbour: float = 0.0) -> None:
        """Enforce a rate-limit quota: ``requests`` calls and ``tokens`` tokens (prompt and completion)
        per ``window`` seconds, reported in the provider's headers, 429 beyond it; ``neighbour``:
        the share of each window another program uses (``quota.py``)."""
        self._registry.set_quota(backend, Quota(requests, tokens, window, neighbour))

    def clear_quota(self, backend: str) -> None:
        self._registry.set_quota(backend, None)

    def quota_stats(self, backend: str) -> QuotaStats | None:
        """Per window: what the backend's callers and the neighbour got, and the 429s (None: no quota)."""
        return self._registry.quota_stats(backend)

    def reset(self, backend: str | None = None) -> None:
        """Drop scripts, rates, latency, keys, quotas and stats of one backend (or all, ``"*"`` included)."""
        self._registry.reset(backend)

    def reset_stats(self, backend: str | None = None) -> None:
        """Zero the counters of one backend, or of all."""
        self._registry.reset_stats(backend)

    def stats(self, backend: str = DEFAULT_BACKEND) -> BackendStats:
        """Snapshot of one backend's counters."""
        return self._registry.stats(backend)

    def total_stats(self) -> BackendStats:
        """Snapshot summed over all backends."""
        return self._registry.total_stats()

    # ---- application ----

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("/b/{backend}", ""):
            for path, fmt in _GENERATION:
                app.router.add_post(prefix + path, self._generation_handler(fmt))
            app.router.add_get(prefix + "/v1/models", self._info_handler("openai", formats.openai_models))
            app.router.add_get(prefix + "/api/tags", self._info_handler("ollama", formats.ollama_tags))
            app.router.add_post(prefix + "/api/show", self._show)
            app.router.add_get(prefix + "/api/version", self._info_handler("ollama", lambda: {"version": "0.12.0"}))
        return app

    def _generation_handler(self, fmt: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._generate(request, fmt)
        return handler

    def _info_handler(self, fmt: str, build: Callable[[], dict[str, Any]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            backend = _backend(request)
            plan = self._registry.peek(backend)
            if not _authorized(request, plan.api_key):
                return _error(fmt, 401, "simulator: invalid API key")
            return web.json_response(build())
        return handler

    async def _show(self, request: web.Request) -> web.StreamResponse:
        if not _authorized(request, self._registry.peek(_backend(request)).api_key):
            return _error("ollama", 401, "simulator: invalid API key")
        body = await _read_json(request)
        model = (body or {}).get("model") or (body or {}).get("name") or "llama3"
        return web.json_response(formats.ollama_show(str(model)))

    async def _generate(self, request: web.Request, fmt: str) -> web.StreamResponse:
        """Count the request for its whole life, including latency and streaming."""
        backend = _backend(request)
        body = await _read_json(request)
        record = RecordedRequest(request.method, request.path,
                                 {k.lower(): v for k, v in request.headers.items()}, body)
        ticket = _Ticket(self._registry, backend, self._registry.arrive(backend, record))
        try:
            return await self._answer(request, fmt, body, ticket)
        finally:
            ticket.leave()

    async def _answer(self, request: web.Request, fmt: str, body: Any, ticket: _Ticket) -> web.StreamResponse:
        plan = ticket.plan
        quota: dict[str, str] = {}
        if isinstance(body, dict) and _authorized(request, plan.api_key):    # counted as it arrives
            reply = formats.plan_reply(fmt, ticket.backend, body)
            allowed, quota = self._registry.charge(ticket.backend, reply.prompt_tokens + reply.completion_tokens,
                                                   fmt)
            if not allowed:
                return await _send(request, _error(fmt, 429, "simulator: rate limit reached for this quota",
                                                   quota), ticket.leave)
        if plan.latency > 0:
            await asyncio.sleep(plan.latency)
        if not _authorized(request, plan.api_key):
            return await _send(request, _error(fmt, 401, "simulator: invalid API key"), ticket.leave)
        if not isinstance(body, dict):
            return await _send(request, _error(fmt, 400, "simulator: request body is not a JSON object"),
                               ticket.leave)
        reply = formats.with_details(fmt, formats.plan_reply(fmt, ticket.backend, body), plan.details)
        stream = formats.wants_stream(body, fmt)
        if plan.fault is not None and plan.fault.kind in ("timeout", "stall") and not (
                stream and plan.fault.kind == "stall"):
            await asyncio.sleep(plan.fault.seconds)
        elif plan.fault is not None and plan.fault.kind != "stall":
            return await _inject(request, fmt, plan.fault, reply, stream, ticket)
        if stream:
            return await _stream(request, fmt, body, reply, ticket, quota)
        resp = web.json_response(_json_builder(fmt)(reply), headers=quota)
        return await _send(request, resp, lambda: ticket.succeed(reply, True))


class _Ticket:
    """One generation request's stay in the statistics.

    Success and departure are recorded just before the last bytes go out, so
    a client that has its full response always sees up-to-date stats.
    """

    def __init__(self, registry: Registry, backend: str, plan: Plan) -> None:
        self.registry, self.backend, self.plan = registry, backend, plan
        self._left = False

    def leave(self) -> None:
        """Idempotent: leave the in-flight count once."""
        if not self._left:
            self._left = True
            self.registry.depart(self.backend)

    def succeed(self, reply: formats.Reply, reported: bool) -> None:
        if not self._left:
            self.registry.succeed(self.backend, reply.prompt_tokens, reply.completion_tokens, reported,
                                  reply.cached_tokens, reply.cache_write_tokens, reply.reasoning_tokens)
        self.leave()


async def _stream(request: web.Request, fmt: str, body: dict[str, Any], reply: formats.Reply,
                  ticket: _Ticket, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Write the stream chunk by chunk, so clients see real incremental delivery."""
    content_type = formats.NDJSON_TYPE if fmt == "ollama" else formats.SSE_TYPE
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                       **(headers or {})})
    await resp.prepare(request)
    chunks = _stream_builder(fmt, body, reply)
    fault = ticket.plan.fault
    stall_at = len(chunks) // 2 if fault is not None and fault.kind == "stall" else -1
    for index, chunk in enumerate(chunks):
        if ticket.plan.chunk_latency > 0:
            await asyncio.sleep(ticket.plan.chunk_latency)
        if index == stall_at:
            assert fault is not None
            await asyncio.sleep(fault.seconds)
        if index == len(chunks) - 1:
            ticket.succeed(reply, formats.usage_in_stream(fmt, body))
        await resp.write(chunk)
    await resp.write_eof()
    return resp


# ---------------------------------------------------------------- helpers


def _backend(request: web.Request) -> str:
    return request.match_info.get("backend") or DEFAULT_BACKEND


async def _read_json(request: web.Request) -> Any:
    """The parsed body, or None when it is empty or not JSON (answered with 400 later)."""
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def _authorized(request: web.Request, key: str | None) -> bool:
    """Accept the key as a Bearer token (OpenAI, xAI, Ollama) or x-api-key (Anthropic)."""
    if key is None:
        return True
    bearer = request.headers.get("Authorization", "")
    return bearer == f"Bearer {key}" or request.headers.get("x-api-key") == key


async def _send(request: web.Request, resp: web.StreamResponse,
                before_body: Callable[[], None]) -> web.StreamResponse:
    """Write the whole response inside the handler, so in-flight counts cover it."""
    await resp.prepare(request)
    before_body()
    await resp.write_eof()
    return resp


def _error(fmt: str, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(formats.error_body(fmt, status, message), status=status, headers=headers)


def _retry_headers(fault: Fault) -> dict[str, str]:
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        value = fault.retry_after
        headers["Retry-After"] = str(int(value)) if float(value).is_integer() else str(value)
    if fault.retry_after_date is not None:
        headers["Retry-After"] = _http_date(fault.retry_after_date)
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = str(fault.retry_after_ms)
    return headers


def _http_date(when: float | datetime | str) -> str:
    """An RFC 7231 date; a number means 'that many seconds from now'."""
    if isinstance(when, str):
        return when
    if isinstance(when, datetime):
        return email.utils.format_datetime(when, usegmt=True)
    return email.utils.formatdate(time.time() + when, usegmt=True)


async def _inject(request: web.Request, fmt: str, fault: Fault, reply: formats.Reply,
                  stream: bool, ticket: _Ticket) -> web.StreamResponse:
    """Answer with the fault instead of the reply (timeouts are handled by the caller)."""
    if fault.kind == "status":
        code = fault.code or 500
        message = fault.message or f"simulator: injected HTTP {code}"
        return await _send(request, _error(fmt, code, message, _retry_headers(fault)), ticket.leave)
    if fault.kind == "drop":
        ticket.leave()
        return await _drop(request)
    if fault.kind == "malformed":
        body, content_type = formats.malformed_body(fmt, stream)
    else:
        body, content_type = formats.missing_fields_body(fmt, reply, stream)
    return await _send(request, web.Response(body=body, headers={"Content-Type": content_type}), ticket.leave)


async def _drop(request: web.Request) -> web.StreamResponse:
    """Close the socket with nothing written, as a crashed upstream would."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


def _json_builder(fmt: str) -> Callable[[formats.Reply], dict[str, Any]]:
    return {"openai": formats.openai_json, "anthropic": formats.anthropic_json,
            "ollama": formats.ollama_json}[fmt]


def _stream_builder(fmt: str, body: dict[str, Any], reply: formats.Reply) -> list[bytes]:
    if fmt == "openai":
        return formats.openai_stream(reply, formats.usage_in_stream(fmt, body))
    if fmt == "anthropic":
        return formats.anthropic_stream(reply)
    return formats.ollama_stream(reply)
