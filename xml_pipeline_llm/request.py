"""One caller request while it is served: what it asked for and what its tries have learnt.

The stop rule is here (``exhausted``: tenacity's ``stop`` and the ledger's
``retried`` / ``error`` outcome both ask it), and so is the error a request
ends with when no try served it (``final_error``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ResolvedBackend
from .errors import Attempt, BackendError, BadRequestError, NoBackendError, ProviderError, RateLimitError
from .options import CallOptions
from .retry import Action, Verdict


@dataclass
class Request:
    """One ``complete()`` or ``stream()`` call and what its tries have learnt so far."""

    model: str
    messages: list[dict[str, Any]]
    kwargs: dict[str, Any]
    agent_id: str | None
    thread_id: str | None
    metadata: dict[str, Any]
    candidates: list[ResolvedBackend]
    options: CallOptions
    tries: int                        # at most this many provider calls
    turn: int = 0                     # round-robin position
    estimate: int | None = None       # prompt tokens, counted once
    attempts: list[Attempt] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)      # failed a try: others first
    dropped: set[str] = field(default_factory=set)     # cannot serve it at all
    unsupported: dict[str, str] = field(default_factory=dict)   # backend -> parameters its provider refused
    last_exc: BaseException | None = None
    span: Any = None                  # the request's telemetry span (telemetry.py), None when off

    def pool(self) -> list[ResolvedBackend]:
        """The candidates not dropped for this request."""
        return [b for b in self.candidates if b.name not in self.dropped]

    def exhausted(self) -> bool:
        """The stop rule: ``retries + 1`` provider calls made, or no candidate left."""
        return len(self.attempts) >= self.tries or not self.pool()

    def note(self, backend: ResolvedBackend, verdict: Verdict, exc: BaseException, detail: str) -> None:
        """A failed try: what it was, and whether the backend may still serve this request."""
        self.attempts.append(Attempt(backend.name, verdict.kind, verdict.status, detail))
        self.verdicts.append(verdict)
        self.last_exc = exc
        if verdict.action is Action.NEXT_BACKEND:
            self.dropped.add(backend.name)
        else:
            self.failed.add(backend.name)

    def final_error(self) -> BackendError:
        """The error for a request that no try could serve, named by how its tries ended."""
        tries = "; ".join(str(a) for a in self.attempts) or "none"
        msg = f"{self.model}: all {len(self.attempts)} tries failed ({tries})"
        last = self.verdicts[-1] if self.verdicts else None
        retryable = last is not None and last.action is Action.RETRY
        if self.unsupported and not retryable:
            return BadRequestError(
                f"{self.model}: no backend takes the request's parameters, so nothing was sent to "
                f"them: {self._refusals()}{f' (tries: {tries})' if self.attempts else ''}. Fix: set "
                f"drop_params: true in the llm: block or on the backend, or pass drop_params=True, "
                f"to have them dropped; or remove them", self.attempts)
        if last is None or not retryable:
            return NoBackendError(msg + "; every backend turned it away: check the backends' keys "
                                  "and models (xml-pipeline-llm check)", self.attempts)
        if last.kind == "rate_limit":
            return RateLimitError(msg + "; slow down or raise retries", self.attempts, last.retry_after)
        if last.kind == "unreachable":
            return ProviderError(msg + "; the backend could not be reached (connection refused or "
                                 "name not resolved): check its base_url and the network", self.attempts)
        return ProviderError(msg + "; the provider is failing, try later", self.attempts, last.status)

    def _refusals(self) -> str:
        provider = {b.name: b.provider.name for b in self.candidates}
        return "; ".join(f"{name} ({provider[name]}) does not take {what}"
                         for name, what in self.unsupported.items())
