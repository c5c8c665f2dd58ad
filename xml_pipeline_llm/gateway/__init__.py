"""The router over HTTP: an OpenAI-compatible gateway (``xml-pipeline-llm serve``) and an in-process client.

``app.Gateway`` answers requests (``translate.py`` maps OpenAI's bodies to
router calls and back, ``errors.py`` maps exceptions to OpenAI error objects,
``auth.py`` holds the virtual keys); ``server.py`` runs it over aiohttp with
workers and a graceful drain; ``inprocess.openai_client()`` serves the same
handling to an ``openai.AsyncOpenAI`` with no socket.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Gateway", "openai_client"]


def __getattr__(name: str) -> Any:
    if name == "Gateway":
        from .app import Gateway

        return Gateway
    if name == "openai_client":
        from .inprocess import openai_client

        return openai_client
    raise AttributeError(f"module 'xml_pipeline_llm.gateway' has no attribute {name!r}")
