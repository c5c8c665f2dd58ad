"""One caller request while it is served: what it asked for and what its tries have learnt.

``Call`` is what the caller asked for, checked and frozen.  ``Request`` is
that call while the request loop (``router.py``) serves it: a chain of
``Step``s, one per model (a plain call has one; an alias of ``llm.models`` or
a call with ``fallbacks=[...]`` has one per model, in order), the step being
tried, and what its tries have learnt.  ``model`` and ``candidates`` are
those of the step being tried (``selection.py`` says which), so everything
downstream (the try, its reservation, its usage event) sees the model really
sent; ``requested_model`` is the name the caller asked for.

The stop rule is here (``exhausted``: the retry policy's ``stop`` and the
ledger's ``retried`` / ``error`` outcome both ask it), and so is the error a
request ends with when no try served it (``final_error``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _litellm
from .backends import ResolvedBackend
from .deadline import Deadline
from .errors import Attempt, BackendError, BadRequestError, NoBackendError, ProviderError, RateLimitError
from .options import CallOptions
from .retry import Action, Verdict


@dataclass
class Step:
    """One model of a request: its name as sent, its backends, and what the tries learnt of them.

    ``failed`` and ``dropped`` are per model: a 404 says that backend lacks this
    model, not the next one.  ``skipped`` says why the whole model is out of the
    request (its context window is too small), "" while it is in.
    """

    model: str
    candidates: list[ResolvedBackend]
    failed: set[str] = field(default_factory=set)      # failed a try: others first
    dropped: set[str] = field(default_factory=set)     # cannot serve it at all
    skipped: str = ""

    def pool(self) -> list[ResolvedBackend]:
        """The candidates not dropped for this request (none once the model is skipped)."""
        if self.skipped:
            return []
        return [b for b in self.candidates if b.name not in self.dropped]


@dataclass(frozen=True)
class Call:
    """What the caller asked for, checked before anything was sent; it does not change while served.

    ``model`` is the name asked for: a model, an alias of ``llm.models``, or
    ``provider/model``; the models really sent are the request's chain.
    """

    model: str
    messages: list[dict[str, Any]]
    kwargs: dict[str, Any]
    agent_id: str | None
    thread_id: str | None
    metadata: dict[str, Any]
    options: CallOptions


@dataclass(eq=False)
class Request:
    """One call while it is served: its ``Call``, and the progress the request loop records.

    Only the loop (``router.py``) changes it, through ``use``, ``skip``,
    ``note`` and ``drop``; everything else reads it.
    """

    call: Call
    chain: list[Step]                 # the models to try, in order (at least one)
    tries: int                        # at most this many provider calls
    deadline: Deadline = field(default_factory=lambda: Deadline(None))   # the whole request's time
    queue_wait: float | None = None   # llm.max_queue_wait: longest wait for a saturated model, when others follow
    turn: int = 0                     # round-robin position
    step: int = 0                     # the model being tried
    attempts: list[Attempt] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)   # backend -> parameters its provider refused
    last_exc: BaseException | None = None
    _estimate: int | None = None
    guard: Any = None                 # the guards' checks riding along the first admission (guards.Pending)

    # ---- what the caller asked for
    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.call.messages

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.call.kwargs

    @property
    def agent_id(self) -> str | None:
        return self.call.agent_id

    @property
    def thread_id(self) -> str | None:
        return self.call.thread_id

    @property
    def metadata(self) -> dict[str, Any]:
        return self.call.metadata

    @property
    def options(self) -> CallOptions:
        return self.call.options

    @property
    def requested_model(self) -> str:
        """The name the caller asked for (an alias, or the model)."""
        return self.call.model

    # ---- where it stands
    @property
    def model(self) -> str:
        """The model being tried, as it is sent."""
        return self.chain[self.step].model

    @property
    def candidates(self) -> list[ResolvedBackend]:
        """The backends serving the model being tried (file order)."""
        return self.chain[self.step].candidates

    @property
    def failed(self) -> set[str]:
        """Backends of the current model that failed a try (others first)."""
        return self.chain[self.step].failed

    @property
    def dropped(self) -> set[str]:
        """Backends that cannot serve the current model at all."""
        return self.chain[self.step].dropped

    @property
    def estimate(self) -> int | None:
        """The prompt estimate if it was made already (``prompt_estimate``), else None."""
        return self._estimate

    def prompt_estimate(self) -> int:
        """LiteLLM's count of the prompt tokens (tools included), made once per request."""
        if self._estimate is None:
            self._estimate = _litellm.token_estimate(self.model, self.messages, self.kwargs.get("tools"))
        return self._estimate

    def use(self, i: int) -> None:
        """Try the ``i``-th model next."""
        self.step = i

    def pool(self) -> list[ResolvedBackend]:
        """The current model's candidates not dropped for this request."""
        return self.chain[self.step].pool()

    def live(self) -> list[tuple[int, Step]]:
        """The models (with their place in the chain) that still have a backend for this request."""
        return [(i, s) for i, s in enumerate(self.chain) if s.pool()]

    def remaining(self) -> list[ResolvedBackend]:
        """Every backend of every model still in the request (what a wait must consider)."""
        seen: dict[str, ResolvedBackend] = {}
        for _, s in self.live():
            for b in s.pool():
                seen.setdefault(b.name, b)
        return list(seen.values())

    def exhausted(self) -> bool:
        """The stop rule: ``retries + 1`` provider calls made (all models together), or no model left."""
        return len(self.attempts) >= self.tries or not self.live()

    def has_next_model(self) -> bool:
        """Whether a model after the current one is still in the request (an alias or fallbacks)."""
        return any(i > self.step for i, _ in self.live())

    def skip(self, reason: str, i: int | None = None) -> bool:
        """Take a model (the current one by default) out of the request; whether another model is left."""
        self.chain[self.step if i is None else i].skipped = reason
        return bool(self.live())

    def drop(self, backend: ResolvedBackend, unsupported: str) -> None:
        """The backend's provider does not take a parameter of the call (nothing was sent to it)."""
        self.dropped.add(backend.name)
        self.unsupported[backend.name] = unsupported

    def note(self, backend: ResolvedBackend, verdict: Verdict, exc: BaseException, detail: str) -> None:
        """A failed try: what it was, and whether the backend may still serve this request."""
        model = self.model if len(self.chain) > 1 else ""
        self.attempts.append(Attempt(backend.name, verdict.kind, verdict.status, detail, model))
        self.verdicts.append(verdict)
        self.last_exc = exc
        if verdict.action is Action.NEXT_BACKEND:
            self.dropped.add(backend.name)
        else:
            self.failed.add(backend.name)

    @property
    def name(self) -> str:
        """How messages name the request: the model, or ``smart (grok-4.1, claude-sonnet-4)``."""
        if len(self.chain) == 1 and self.requested_model == self.model:
            return self.model
        return f"{self.requested_model} ({', '.join(s.model for s in self.chain)})"

    def skipped_models(self) -> str:
        """``; claude-x skipped: ...`` for each model taken out of the request ("" for none)."""
        return "".join(f"; {s.model} skipped: {s.skipped}" for s in self.chain if s.skipped)

    def final_error(self) -> BackendError:
        """The error for a request that no try could serve, named by how its tries ended."""
        tries = "; ".join(str(a) for a in self.attempts) or "none"
        msg = f"{self.name}: all {len(self.attempts)} tries failed ({tries}){self.skipped_models()}"
        last = self.verdicts[-1] if self.verdicts else None
        retryable = last is not None and last.action is Action.RETRY
        if self.unsupported and not retryable:
            return BadRequestError(
                f"{self.name}: no backend takes the request's parameters, so nothing was sent to "
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
        provider = {b.name: b.provider.name for s in self.chain for b in s.candidates}
        return "; ".join(f"{name} ({provider[name]}) does not take {what}"
                         for name, what in self.unsupported.items())
