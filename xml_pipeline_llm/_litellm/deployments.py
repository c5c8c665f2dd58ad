"""Backends as LiteLLM deployments: the model list, the call each try makes, a real ``litellm.Router``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..backends import ResolvedBackend
from .load import load


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
