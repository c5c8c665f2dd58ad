"""The exceptions a caller of xml_pipeline_llm can see.

Callers catch ``BackendError`` for "the call could not be served"; the
subclasses say why, so that an agent can, for instance, shorten its prompt
on ``BadRequestError`` but back off on ``RateLimitError``.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """The ``llm:`` block (or the file holding it) is wrong.

    The message names the place (``llm.backends[1].rate_limit_tpm``), what was
    expected, what was found and how to fix it.  Several problems are listed
    one per line.
    """


@dataclass(frozen=True)
class Attempt:
    """One provider call made for a request: which backend, and what went wrong."""

    backend: str
    kind: str  # one of retry.KINDS: "rate_limit", "server_error", "timeout", "unreachable", ...
    status: int | None
    detail: str = ""
    model: str = ""   # the model sent, when the request had several (an alias or fallbacks=)

    def __str__(self) -> str:
        status = f" {self.status}" if self.status is not None else ""
        model = f" ({self.model})" if self.model else ""
        return f"{self.backend}{model}: {self.kind}{status}"


class BackendError(Exception):
    """A request could not be served by any backend.

    ``attempts`` lists every try (backend, error kind, status); ``__cause__``
    is the last provider error, as LiteLLM raised it.
    """

    def __init__(self, message: str, attempts: list[Attempt] | None = None) -> None:
        super().__init__(message)
        self.attempts: list[Attempt] = list(attempts or [])

    @property
    def kind(self) -> str | None:
        """How the last try ended (``timeout``, ``rate_limit``, ``server_error``, ...); None: no try."""
        return self.attempts[-1].kind if self.attempts else None


class ModelNotFoundError(BackendError):
    """No configured backend serves the requested model (no call was made)."""


class NoBackendError(BackendError):
    """Every backend serving the model turned the request away for itself (401, 403, 404).

    A bad key, no access, or a model that backend does not have: each was
    tried once and dropped for this request.  ``attempts`` says which and why.
    """


class BadRequestError(BackendError):
    """The request itself cannot be served as it is; retrying cannot help.

    The provider rejected it (HTTP 400/422), or it was refused before anything
    was sent: a malformed call, an argument ``complete()`` does not take, or a
    parameter that no candidate's provider supports.
    """

    def __init__(self, message: str, attempts: list[Attempt] | None = None,
                 status_code: int = 400) -> None:
        super().__init__(message, attempts)
        self.status_code = status_code


class RateLimitError(BackendError):
    """The last try was answered with HTTP 429; ``retry_after`` is the provider's hint in seconds."""

    def __init__(self, message: str, attempts: list[Attempt] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, attempts)
        self.retry_after = retry_after


class ProviderError(BackendError):
    """The last try failed on the provider's side (5xx, timeout, broken response)."""

    def __init__(self, message: str, attempts: list[Attempt] | None = None,
                 status_code: int | None = None) -> None:
        super().__init__(message, attempts)
        self.status_code = status_code


class DeadlineExceededError(BackendError, TimeoutError):
    """The request's ``deadline`` passed (or could not be met) before it was served.

    ``deadline`` is the request's allowance in seconds and ``waiting_for`` what
    it was doing when time ran out ("a slot on xai-main", "the cooldown of
    xai-main", "the answer from xai-main", ...).  Nothing of the request is left
    in flight or reserved when this is raised.
    """

    def __init__(self, message: str, attempts: list[Attempt] | None = None, *,
                 deadline: float | None = None, waiting_for: str = "") -> None:
        super().__init__(message, attempts)
        self.deadline = deadline
        self.waiting_for = waiting_for


class LoopDetectedError(BackendError):
    """A thread sent the same request more than ``llm.guards.repeat_limit`` times within ``repeat_window``.

    Nothing was sent; never retried, never failed over.  ``count`` is how many
    identical requests the thread made in the window, this one included;
    ``window`` is the window in seconds.
    """

    def __init__(self, message: str, thread_id: str, agent_id: str | None, count: int, window: float) -> None:
        super().__init__(message)
        self.thread_id, self.agent_id, self.count, self.window = thread_id, agent_id, count, window


class CallLimitError(BackendError):
    """A thread made ``llm.guards.max_calls_per_thread`` requests (``limit``); nothing was sent.

    ``end_thread(thread_id)`` forgets the count.  Never retried, never failed over.
    """

    def __init__(self, message: str, thread_id: str, limit: int) -> None:
        super().__init__(message)
        self.thread_id, self.limit = thread_id, limit


class BlockedError(BackendError):
    """The caller is blocked (``router.block`` or ``xml-pipeline-llm block``); nothing was sent.

    ``reason`` is the operator's reason; ``block`` the entry that matched
    (agent, thread, metadata, reason, since).  Never retried, never failed over.
    """

    def __init__(self, message: str, reason: str, block: object = None) -> None:
        super().__init__(message)
        self.reason, self.block = reason, block


# ---------------------------------------------------------------- raised and caught inside the package


class TryTimedOut(TimeoutError):
    """A try ran past its timeout, or a stream went quiet past its idle timeout, by our own clock."""


class Saturated(Exception):
    """The backend could not admit the try within ``llm.max_queue_wait`` while another model follows."""


class EmptyStreamError(Exception):
    """The stream ended before any content: LiteLLM's answer to a malformed stream body."""

    kind = "bad_response"


class StreamCut(Exception):
    """No chunk came in time once a stream had handed out text; ``why``: idle, timeout or deadline."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
