"""Keeping secrets out of messages: keys masked in text, passwords in URLs, api_key entries.

A leaf module: it imports nothing of the package, so that any module (the
config, the router, the Redis client, the CLI) can use it cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


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


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            creds, host = netloc.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            netloc = f"{user}:***@{host}"
        elif "@" in netloc:          # redis://secret@host (a bare password)
            creds, host = netloc.rsplit("@", 1)
            netloc = f"***@{host}"
        query = parts.query
        if query:
            query = urlencode([(k, "***" if _secret_key(k) else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)])
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "(unparseable URL)"


def url_secrets(url: str) -> list[str]:
    """The secrets in a URL (its password, secret query values), to mask wherever they could show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if v and _secret_key(k)]
    return found


def _secret_key(name: str) -> bool:
    """Whether a URL query parameter holds a secret (password=..., token=...)."""
    return "pass" in name.lower() or "token" in name.lower()
