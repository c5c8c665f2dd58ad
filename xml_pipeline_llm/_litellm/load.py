"""Importing LiteLLM (once, offline defaults first), its usage callback, and which tries it sent."""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..env import OFFLINE_DEFAULTS  # set at package import; again before LiteLLM is, in case they were removed

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


def only_ours(litellm: Any) -> bool:
    """Whether every success callback LiteLLM has is the package's own."""
    return all(cb is _callback for name in ("callbacks", "success_callback", "_async_success_callback")
               for cb in getattr(litellm, name, None) or ())


def register(router_id: str, services: Any) -> None:
    """Have LiteLLM's success callback hand a router's calls to ``services.record_from_callback``."""
    _ROUTERS[router_id] = services


def _make_callback() -> Any:
    """The CustomLogger that tells which tries LiteLLM sent, and records successes it is given.

    ``log_pre_api_call`` runs just before LiteLLM sends a try (see ``sent``).
    The router records each answer itself as soon as LiteLLM returns it
    (read-your-writes), so LiteLLM's success logging (a logging payload, the
    cost again, a task on its logging worker: about a tenth of a call's CPU)
    serves only other listeners.  While LiteLLM has no success callback but
    this one, each try is marked as logged before it is sent, and LiteLLM
    skips that work.  When a user adds callbacks of their own (``litellm.callbacks``,
    ``litellm.success_callback``), LiteLLM logs every call for them as usual, and
    this callback's ``async_log_success_event`` finds each call already counted.
    """
    from litellm.integrations.custom_logger import CustomLogger

    class UsageCallback(CustomLogger):
        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            meta = (kwargs.get("litellm_params") or {}).get("metadata") or {}
            tag = meta.get("xpl_try")
            if tag:
                _SENT.add(tag)
                if only_ours(_module):     # nobody else listens: no success logging to do
                    kwargs["has_logged_async_success"] = kwargs["has_logged_sync_success"] = True

        async def async_log_success_event(self, kwargs: Any, response_obj: Any,
                                          start_time: Any, end_time: Any) -> None:
            meta = (kwargs.get("litellm_params") or {}).get("metadata") or {}
            services = _ROUTERS.get(meta.get("xpl_router", ""))
            if services is not None:
                services.record_from_callback(meta, kwargs, response_obj, start_time, end_time)

    return UsageCallback()


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
