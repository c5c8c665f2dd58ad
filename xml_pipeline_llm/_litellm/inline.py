"""LiteLLM's per-call setup on the event loop's own thread, for providers whose setup reads only memory.

``litellm.acompletion()`` runs the synchronous ``completion()`` in the loop's
default executor, a thread, then awaits the request it returns.
``completion()`` maps the parameters and prepares the request; for the
API-key providers it does no I/O.  Under load, that hop costs the gateway
about a seventh of a plain call's CPU: the thread switches, and the loop and
the pool contending for the GIL.  With the setup run inline, a plain call at
64 clients took 0.85x the CPU (``benchmarks/bench_gateway.py``'s harness,
2026-12-06).

``InlineSetup`` is a default executor that runs that setup inline for
``openai/``, ``xai/`` and ``anthropic/`` models.  Everything else goes to its
thread pool as before:
- other providers, whose setup may fetch credentials or model information
  over the network (Bedrock, Vertex AI, Ollama);
- DNS lookups;
- any other work sent to the default executor.

``xml-pipeline-llm serve`` installs it in its workers.  A program's own event
loop is left as it is.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from .load import load

INLINE_PREFIXES = ("openai/", "xai/", "anthropic/")


class InlineSetup(ThreadPoolExecutor):
    """A loop's default executor that runs LiteLLM's ``completion()`` setup inline for the API-key providers."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        if args or kwargs or not _is_setup(fn):
            return super().submit(fn, *args, **kwargs)
        future: Future[Any] = Future()
        try:
            future.set_result(fn())
        except BaseException as exc:        # handed to the awaiting caller, as the pool would
            future.set_exception(exc)
        return future


def _is_setup(fn: Any) -> bool:
    """Whether ``fn`` is ``acompletion()``'s ``ctx.run(completion, ...)`` for an inline provider's model."""
    inner = fn.args[0] if isinstance(fn, partial) and len(fn.args) == 1 else None
    if not isinstance(inner, partial) or inner.func is not load().main.completion:
        return False
    model = inner.keywords.get("model")
    provider = inner.keywords.get("custom_llm_provider")
    return isinstance(model, str) and model.startswith(INLINE_PREFIXES) and provider in (None, "openai", "xai",
                                                                                        "anthropic")
