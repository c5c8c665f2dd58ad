"""Virtual keys: who is calling, as what agent, with which metadata, for which models.

Only each key's SHA-256 is kept in memory.  A presented key is hashed and
compared with every configured digest by ``hmac.compare_digest`` (constant
time, and every digest is compared, so the time does not say which key
nearly matched).  A key never appears in a message, log line or response.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from ..errors import ConfigError
from .errors import forbidden, unauthorized

ANY_AGENT = "*"


@dataclass(frozen=True)
class Identity:
    """What a request's key allows: its agent (``"*"``: the caller names it), metadata, models, admin."""

    agent: str = ANY_AGENT
    metadata: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] | None = None     # None: every model
    admin: bool = False
    name: str = ""                            # how logs name the key: keys[i]

    def allows(self, model: str) -> bool:
        """Whether ``model`` (a name, alias, ``provider/model`` or ``backend/model``) is allowed."""
        if self.models is None:
            return True
        bare = model.split("/", 1)[1] if "/" in model else model
        return any(fnmatchcase(model, p) or fnmatchcase(bare, p) for p in self.models)

    def agent_for(self, named: str | None) -> str | None:
        """The agent a call is booked to: the key's own, or (``"*"``) the one the caller named."""
        if self.agent == ANY_AGENT:
            return named or None
        if named and named != self.agent:
            raise forbidden(f"this key is for agent {self.agent!r}; it may not call as {named!r} "
                            f"(drop X-Agent-Id, or use a key whose agent is \"*\")", "agent_not_allowed")
        return self.agent


#: Without keys every caller is trusted (loopback only) and names its own agent.
OPEN = Identity(admin=True, name="no keys")


class Keys:
    """The configured virtual keys, as SHA-256 digests."""

    def __init__(self, entries: Sequence[tuple[bytes, Identity]]) -> None:
        self._entries = list(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Keys({len(self._entries)} keys)"

    def identify(self, authorization: str | None) -> Identity:
        """The identity of ``Authorization: Bearer <key>``; 401 when missing or unknown."""
        if not self._entries:
            return OPEN
        if not authorization:
            raise unauthorized("no API key: send Authorization: Bearer <key> (the OpenAI SDKs' api_key)")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("expected Authorization: Bearer <key> (the OpenAI SDKs' api_key)")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found: Identity | None = None
        for known, identity in self._entries:          # compare with every key: no early exit
            if hmac.compare_digest(digest, known) and found is None:
                found = identity
        if found is None:
            raise unauthorized("unknown API key")
        return found

    def admin(self, authorization: str | None) -> Identity:
        """An admin identity, or 401 (no/unknown key) / 403 (a valid key without ``admin: true``)."""
        identity = self.identify(authorization)
        if not identity.admin:
            raise forbidden("this endpoint needs a key with admin: true in llm.gateway.keys")
        return identity


def load_keys(gateway: Any, environ: Mapping[str, str] | None = None) -> Keys:
    """``llm.gateway.keys`` resolved: each ``key_env`` must be set (else ConfigError naming it)."""
    env = os.environ if environ is None else environ
    entries: list[tuple[bytes, Identity]] = []
    problems: list[str] = []
    for i, k in enumerate(gateway.keys):
        where = f"llm.gateway.keys[{i}]"
        if k.key_env is not None:
            value = env.get(k.key_env)
            if not value:
                problems.append(f"{where}.key_env: environment variable {k.key_env} is not set; export it or "
                                f"add {k.key_env}=... to .env before starting the gateway")
                continue
            digest = hashlib.sha256(value.encode()).digest()
            name = f"keys[{i}] ({k.key_env})"
        else:
            digest = bytes.fromhex(k.key_sha256)
            name = f"keys[{i}] (sha256 {k.key_sha256[:8]}...)"
        entries.append((digest, Identity(k.agent, dict(k.metadata),
                                         None if k.models is None else tuple(k.models), k.admin, name)))
    if problems:
        raise ConfigError("\n".join(problems))
    return Keys(entries)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches only this machine."""
    name = host.strip().strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, keys: Keys) -> None:
    """Refuse a non-loopback address without keys: the router would be open to the network."""
    if not keys.enabled and not is_loopback(host):
        raise ConfigError(
            f"llm.gateway: refusing to listen on {host} without keys: anyone who can reach it could spend "
            f"through every backend. Add llm.gateway.keys (e.g. [{{key_env: GATEWAY_KEY, agent: \"*\"}}]) "
            f"or listen on 127.0.0.1 (--host 127.0.0.1)")

