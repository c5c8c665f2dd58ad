"""Everything that touches LiteLLM lives here, imported on first use.

``import litellm`` takes seconds, so the package imports this module only when
a router makes its first call.  Before LiteLLM is imported its run-time fetches
(cost map, Anthropic beta headers) are switched off unless the user chose
otherwise, so nothing leaves the machine except calls to configured backends.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .backends import ResolvedBackend
from .env import OFFLINE_DEFAULTS  # set at package import; again before LiteLLM is, in case they were removed
from .errors import EmptyStreamError
from .response import LLMResponse

log = logging.getLogger("xml_pipeline_llm")

# Routers that want the callback's events, by id (weak: a dropped router is forgotten).
_ROUTERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_callback: Any = None
_module: Any = None


def load() -> Any:
    """Import LiteLLM with the offline defaults and our callback registered (once)."""
    global _callback, _module
    if _module is not None:        # the per-call path: no environment or import lookups
        return _module
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import litellm

    if _callback is None:
        litellm.suppress_debug_info = True
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            # LiteLLM logs every call at INFO and loop changes at WARNING; the
            # router logs what matters itself.  A user can lower this again.
            logging.getLogger(name).setLevel(logging.ERROR)
        litellm.telemetry = False
        _callback = _make_callback()
        litellm.callbacks = [*litellm.callbacks, _callback]
        _logging_worker_per_loop()
        _module_client_per_loop(litellm)
    _module = litellm
    return litellm


def _module_client_per_loop(litellm: Any) -> None:
    """Make ``litellm.module_level_aclient`` the running loop's own HTTP client.

    Several of LiteLLM's paths (Anthropic's streams, Ollama's completions, the
    OpenAI-compatible handler, a stream wrapper's deferred ``make_call``) send
    through ``litellm.module_level_aclient``.  LiteLLM builds that client once,
    through its per-loop client cache, for whichever loop first asks, and then
    keeps it as a plain module attribute: every other event loop then sends
    over the first loop's connection pool, and its calls fail with connection
    errors or hang.  Giving the module a class whose ``module_level_aclient``
    is a property that asks the per-loop cache on each access puts every loop
    on its own client (LiteLLM's cache keys clients by loop), on every path
    that reads the attribute.
    """
    from litellm.llms.custom_httpx.http_handler import get_async_httpx_client

    module_type = type(litellm)
    if getattr(module_type, "_xpl_per_loop", False):
        return

    def current(_: Any) -> Any:
        timeout = vars(litellm).get("request_timeout")
        return get_async_httpx_client(
            llm_provider="litellm_module_level_client",
            params={"timeout": timeout if isinstance(timeout, (int, float)) else None,
                    "client_alias": "module level aclient"})

    def ignore(_: Any, value: Any) -> None:   # LiteLLM caches the first client here: ours wins
        pass

    per_loop = type("LiteLLMModule", (module_type,), {
        "_xpl_per_loop": True, "module_level_aclient": property(current, ignore)})
    vars(litellm).pop("module_level_aclient", None)
    litellm.__class__ = per_loop


class _LoopWorkers:
    """LiteLLM's logging worker, one per running event loop.

    LiteLLM hands every success callback to one global ``LoggingWorker`` whose
    queue and tasks belong to the loop that last used it; when several threads
    run their own loops at once, that worker is moved from loop to loop and
    drops or re-awaits their callbacks ("cannot reuse already awaited
    coroutine", "bound to a different event loop").  This stands in its place
    and gives each loop a worker of its own; closed loops' idle workers are
    forgotten.
    """

    def __init__(self, first: Any, factory: Callable[[], Any]) -> None:
        self._first = first
        self._factory = factory
        self._by_loop: dict[asyncio.AbstractEventLoop, Any] = {}
        self._lock = threading.Lock()

    def _current(self) -> Any:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._first
        worker = self._by_loop.get(loop)
        if worker is None:
            with self._lock:
                for old, w in list(self._by_loop.items()):
                    if old.is_closed() and not w.pending_count:
                        del self._by_loop[old]
                        if w is not self._first:
                            atexit.unregister(w._flush_on_exit)
                worker = self._by_loop[loop] = self._first if not self._by_loop else self._factory()
        return worker

    def ensure_initialized_and_enqueue(self, async_coroutine: Any) -> None:
        self._current().ensure_initialized_and_enqueue(async_coroutine)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)


def _logging_worker_per_loop() -> None:
    from litellm.litellm_core_utils import logging_worker

    if not isinstance(logging_worker.GLOBAL_LOGGING_WORKER, _LoopWorkers):
        logging_worker.GLOBAL_LOGGING_WORKER = _LoopWorkers(  # type: ignore[assignment,misc]
            logging_worker.GLOBAL_LOGGING_WORKER, logging_worker.LoggingWorker)


def deployment(b: ResolvedBackend) -> dict[str, Any]:
    """The LiteLLM Router deployment for a backend: a wildcard serving ``<backend>/<model>``."""
    params: dict[str, Any] = {
        "model": f"{b.provider.litellm_prefix}/*",
        "timeout": b.timeout,
        "max_retries": 0,          # the OpenAI SDK's own retries: off, ours rule
    }
    if b.drop_params:
        params["drop_params"] = True
    if b.base_url:
        params["api_base"] = b.base_url
    if b.api_key is not None:
        params["api_key"] = b.api_key.get_secret_value()
    elif b.provider.name == "openai" and b.base_url:
        params["api_key"] = "not-needed"   # OpenAI-compatible local servers take no key
    return {"model_name": f"{b.name}/*", "litellm_params": params}


class Deployments:
    """The backends as a LiteLLM Router model list, called the way the Router calls them.

    Once ``litellm.Router`` has picked a deployment it calls
    ``litellm.acompletion`` with that deployment's ``litellm_params``.  The
    picking, retries, fallbacks and cooldowns are ours (strategies.py, retry.py), so we make
    that last call ourselves: the Router's per-call bookkeeping cost about a
    quarter of LiteLLM's CPU per call here, and grew with the number of
    deployments (benchmarks/README.md).  ``build_router`` gives a real Router
    over the same model list for anyone who wants one.
    """

    def __init__(self, backends: list[ResolvedBackend]) -> None:
        self.model_list = [deployment(b) for b in backends]
        self._params = {d["model_name"][:-2]: d["litellm_params"] for d in self.model_list}
        self._acompletion = load().acompletion

    async def acompletion(self, backend: str, model: str, *, timeout: float | None = None,
                          drop_params: bool | None = None, **kwargs: Any) -> Any:
        """``litellm.acompletion`` on ``backend``'s deployment for ``model``.

        LiteLLM's retries (``num_retries``, which would otherwise fall back to
        ``litellm.num_retries``) and the OpenAI SDK's (``max_retries``) are off on
        every call, whatever else is set: the package's retry rules are the only ones.
        """
        params = self._params[backend]
        call = {**kwargs, **params, "model": params["model"][:-1] + model,
                "num_retries": 0, "max_retries": 0}
        if timeout is not None:
            call["timeout"] = timeout
        if drop_params is not None:
            call["drop_params"] = drop_params
        return await self._acompletion(**call)


def build_router(backends: list[ResolvedBackend], timeout: float) -> Any:
    """A ``litellm.Router`` over the same model list, its retries, fallbacks and cooldowns off."""
    lt = load()
    with _ollama_lookups_to(next((b.base_url for b in backends if b.provider.name == "ollama"), None)):
        return lt.Router(
            model_list=Deployments(backends).model_list,
            num_retries=0,
            max_fallbacks=0,
            disable_cooldowns=True,
            timeout=timeout,
        )


@contextmanager
def _ollama_lookups_to(base_url: str | None) -> Iterator[None]:
    """Point LiteLLM's model-info lookup for Ollama deployments at a configured server.

    Registering an ``ollama_chat/`` deployment makes LiteLLM POST ``/api/show``
    to ``$OLLAMA_API_BASE`` or ``localhost:11434``, whatever the deployment's
    ``api_base``; aiming it at a configured Ollama backend keeps traffic to the
    configured backends only.
    """
    if base_url is None:
        yield
        return
    old = os.environ.get("OLLAMA_API_BASE")
    os.environ["OLLAMA_API_BASE"] = base_url
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OLLAMA_API_BASE", None)
        else:
            os.environ["OLLAMA_API_BASE"] = old


def register(router_id: str, services: Any) -> None:
    """Have LiteLLM's success callback hand a router's calls to ``services.record_from_callback``."""
    _ROUTERS[router_id] = services


def text_tokens(model: str, text: str) -> int:
    """LiteLLM's count of the tokens in ``text`` (a stream's answer abandoned before its usage came)."""
    return int(load().token_counter(model=model, text=text)) if text else 0


def token_estimate(model: str, messages: list[dict[str, Any]], tools: Any = None) -> int:
    """LiteLLM's count of the prompt tokens (used to reserve rate-limit tokens)."""
    lt = load()
    try:
        return int(lt.token_counter(model=model, messages=messages, tools=tools))
    except Exception:   # an odd message shape must not fail the call: count characters
        return sum(len(str(m.get("content") or "")) for m in messages) // 3 + 3 * len(messages)


_WINDOWS: dict[tuple[str, str], int | None] = {}


def context_window(model: str, provider: str) -> int | None:
    """The model's input window in tokens from LiteLLM's model info (``max_input_tokens``, else
    ``max_tokens``); None for a model LiteLLM does not know (no check).  Asked once per pair."""
    key = (model, provider)
    if key in _WINDOWS:
        return _WINDOWS[key]
    window: int | None = None
    try:
        info = load().get_model_info(model, custom_llm_provider=provider)
    except Exception:       # not mapped (or LiteLLM could not say): no check
        info = None
    if info:
        value = info.get("max_input_tokens") or info.get("max_tokens")
        window = int(value) if isinstance(value, (int, float)) and value > 0 else None
    _WINDOWS[key] = window
    return window


def in_cost_map(model: str, provider: str) -> bool:
    """Whether LiteLLM's cost map prices ``model`` called on ``provider``.

    LiteLLM answers 0.0 for some unknown models (a generalised fallback), and an
    entry of the bare name may belong to another provider than the one called
    (``claude-*`` through an OpenAI-compatible gateway), so the map must have a
    non-zero price and LiteLLM must be able to apply it on this provider.
    """
    lt = load()
    entries = [lt.model_cost.get(model), lt.model_cost.get(f"{provider}/{model}")]
    if not any(e and (e.get("input_cost_per_token") or e.get("output_cost_per_token")) for e in entries):
        return False
    try:
        p, c = lt.cost_per_token(model=model, custom_llm_provider=provider,
                                 prompt_tokens=1000, completion_tokens=1000)
    except Exception:
        return False
    return bool(p + c > 0)


def usage_cost(model: str, provider: str, usage: Any, info: Mapping[str, Any] | None = None) -> float:
    """LiteLLM's price of ``usage`` (its own ``Usage``, or a mapping of our usage fields) on ``model``.

    ``info``: the model's price as LiteLLM model info, used instead of the cost map's.
    """
    lt = load()
    if usage is None or isinstance(usage, Mapping):
        usage = litellm_usage(usage or {})
    p, c = lt.cost_per_token(model=model, custom_llm_provider=provider, usage_object=usage,
                             requested_model_info_override=dict(info) if info is not None else None)
    return float(p + c)


def litellm_usage(usage: Mapping[str, int]) -> Any:
    """Our usage fields as LiteLLM's ``Usage`` (cache reads, cache writes and reasoning in its details)."""
    p = int(usage.get("prompt_tokens", 0))
    c = int(usage.get("completion_tokens", 0))
    cached, write = int(usage.get("cached_tokens", 0)), int(usage.get("cache_write_tokens", 0))
    reasoning = int(usage.get("reasoning_tokens", 0))
    extra: dict[str, Any] = {}
    if cached or write:
        extra["prompt_tokens_details"] = {"cached_tokens": cached, "cache_creation_tokens": write}
        extra["cache_read_input_tokens"] = cached
        extra["cache_creation_input_tokens"] = write
    if reasoning:
        extra["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return load().Usage(prompt_tokens=p, completion_tokens=c,
                        total_tokens=int(usage.get("total_tokens", 0)) or p + c, **extra)


def _count(obj: Any, name: str) -> int:
    value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return int(value) if isinstance(value, (int, float)) else 0


def usage_of(resp: Any) -> dict[str, int]:
    """The usage of a response (or stream chunk): token counts, cache reads and writes, reasoning.

    ``prompt_tokens`` counts every input token (LiteLLM adds Anthropic's cache
    reads and writes to its ``input_tokens``); ``cached_tokens`` is OpenAI/xAI
    ``prompt_tokens_details.cached_tokens`` or Anthropic ``cache_read_input_tokens``,
    ``cache_write_tokens`` Anthropic ``cache_creation_input_tokens``,
    ``reasoning_tokens`` ``completion_tokens_details.reasoning_tokens``; 0 when not reported.
    """
    usage = getattr(resp, "usage", None)
    p = _count(usage, "prompt_tokens")
    c = _count(usage, "completion_tokens")
    t = _count(usage, "total_tokens") or (p + c)
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    cached = _count(prompt_details, "cached_tokens") or _count(usage, "cache_read_input_tokens")
    write = _count(usage, "cache_creation_input_tokens") or _count(prompt_details, "cache_creation_tokens")
    reasoning = _count(getattr(usage, "completion_tokens_details", None), "reasoning_tokens")
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t, "cached_tokens": cached,
            "cache_write_tokens": write, "reasoning_tokens": reasoning}


def to_response(resp: Any, backend: str, latency_ms: float, cost_usd: float | None) -> LLMResponse:
    """LiteLLM's ModelResponse as our LLMResponse."""
    choice = resp.choices[0]
    message = choice.message
    calls = [tc.model_dump() if hasattr(tc, "model_dump") else dict(tc)
             for tc in (getattr(message, "tool_calls", None) or [])]
    return LLMResponse(
        content=message.content or "",
        model=strip_route(resp.model or ""),
        usage=usage_of(resp),
        finish_reason=choice.finish_reason or "",
        raw=resp,
        backend=backend,
        cost_usd=cost_usd,
        latency_ms=latency_ms,
        tool_calls=calls,
    )


_ROUTES = ("ollama_chat/", "ollama/")


def strip_route(model: str) -> str:
    """The model name as the provider knows it: LiteLLM reports Ollama's as ``ollama_chat/llama3``."""
    for route in _ROUTES:
        if model.startswith(route):
            return model[len(route):]
    return model


def call_id(resp: Any) -> str:
    hidden = getattr(resp, "_hidden_params", None) or {}
    return str(hidden.get("litellm_call_id") or getattr(resp, "id", "") or "")


def _make_callback() -> Any:
    """The CustomLogger that records successful calls for the router that made them.

    The router records each answer itself as soon as LiteLLM returns it
    (read-your-writes); this callback, which LiteLLM may run later, then finds
    the call id already counted and adds nothing.  It is the safety net for
    any path where the router could not see the final response.
    """
    from litellm.integrations.custom_logger import CustomLogger

    class UsageCallback(CustomLogger):
        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            meta = (kwargs.get("litellm_params") or {}).get("metadata") or {}
            tag = meta.get("xpl_try")
            if tag:
                _SENT.add(tag)

        async def async_log_success_event(self, kwargs: Any, response_obj: Any,
                                          start_time: Any, end_time: Any) -> None:
            meta = (kwargs.get("litellm_params") or {}).get("metadata") or {}
            services = _ROUTERS.get(meta.get("xpl_router", ""))
            if services is not None:
                services.record_from_callback(meta, kwargs, response_obj, start_time, end_time)

    return UsageCallback()


# ------------------------------------------------------------ was it sent, and why it failed

_tries = itertools.count(1)
_SENT: set[str] = set()


def new_try() -> str:
    """A tag for one provider try, carried in its metadata so that ``sent`` can tell."""
    return f"t{next(_tries)}"


def sent(tag: str) -> bool:
    """Whether LiteLLM got as far as sending the try tagged ``tag``.

    LiteLLM calls its loggers' ``log_pre_api_call`` just before the HTTP
    request; an error raised before that (an unsupported parameter, a message
    it cannot translate) is not a provider failure.
    """
    return tag in _SENT


def forget(tag: str) -> None:
    """The try is over: drop its tag."""
    _SENT.discard(tag)


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
