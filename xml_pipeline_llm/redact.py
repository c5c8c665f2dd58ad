"""Keeping secrets out of messages: keys masked in text, passwords in URLs, api_key entries.

A leaf module: it imports nothing of the package, so that any module (the
config, the router, the Redis client, the CLI) can use it cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def mask(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret of 8 characters or more shown as ``sk-...abcd``."""
    for secret in secrets:
        if len(secret) >= 8 and secret in text:
            text = text.replace(secret, f"{secret[:3]}...{secret[-4:]}")
    return text


def short(exc: BaseException, secrets: Iterable[str] = (), limit: int = 200) -> str:
    """An error's text on one line, at most ``limit`` characters, secrets masked."""
    text = " ".join(str(exc).split())
    return mask(text if len(text) <= limit else text[:limit - 3] + "...", secrets)


def redact_mapping(value: Any) -> Any:
    """``value`` with every ``api_key`` entry of a mapping (at any depth) hidden."""
    if isinstance(value, Mapping):
        return {k: ("***" if k == "api_key" else redact_mapping(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_mapping(v) for v in value]
    return value
