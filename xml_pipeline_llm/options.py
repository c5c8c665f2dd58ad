"""What the caller asked for: the call's shape and its per-call options, checked before anything is sent.

``complete()`` and ``stream()`` take the package's own options
beside the provider parameters that go to LiteLLM in OpenAI form:

    timeout=30          seconds for each try of this call (replaces the configured timeout)
    stream_idle_timeout=10  seconds a stream may go without a chunk (default: the try's timeout)
    deadline=60         seconds the whole request may take: waits, tries, backoff, fallbacks
    retries=1           tries after the first, for this call (num_retries= and max_retries= too)
    drop_params=True    let LiteLLM drop parameters a provider does not support
    priority="high"     high, normal (default) or low: the order among waiters (fairness.py)
    fallbacks=[...]     models (or aliases) to try, in order, once the model's backends are out
    cache=False         skip the response cache (llm.cache) for this call: neither read nor write;
                        cache=True uses it for a call it would not cache (not deterministic)
    cache_ttl=60        seconds: keep this answer that long, and take no cached answer older

These are never handed to LiteLLM as LiteLLM options, and LiteLLM's and the
OpenAI SDK's own retries are always switched off on the call itself
(``num_retries=0``, ``max_retries=0``), whatever the caller passed, so the
package's retry rules are the only ones in force.  Arguments that would bypass
the config (``api_key``, ``api_base``, ``base_url``, ``custom_llm_provider``)
and ``stream=True`` on ``complete()`` raise ``BadRequestError`` naming the fix.
A malformed model or message list raises ``BadRequestError`` naming the
message index and field; nothing is sent or counted for any of these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadRequestError
from .fairness import PRIORITIES, Priority

# Arguments that would route around the llm: block, and what to do instead.
BYPASS = {
    "api_key": "keys come from the backend's api_key_env in the llm: block",
    "api_base": "the endpoint is the backend's base_url in the llm: block",
    "base_url": "the endpoint is the backend's base_url in the llm: block",
    "custom_llm_provider": "the provider is the backend's provider: in the llm: block, "
                           "or a prefix on the model name (anthropic/claude-sonnet-4)",
    "retry_policy": "use retries= (the package's retry rules are the only ones in force)",
    "context_window_fallback_dict": "the package routes the call itself; name another model instead",
}
RETRY_SYNONYMS = ("retries", "num_retries", "max_retries")
ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})


@dataclass(frozen=True)
class CallOptions:
    """The package's own per-call options (None: the configured value)."""

    timeout: float | None = None
    stream_idle_timeout: float | None = None
    deadline: float | None = None
    retries: int | None = None
    drop_params: bool | None = None
    priority: Priority = "normal"
    fallbacks: tuple[str, ...] = ()
    cache: bool | None = None          # the response cache for this call (None: by the rule)
    cache_ttl: float | None = None     # seconds (None: llm.cache.ttl)


def split_options(kwargs: dict[str, Any], *, streaming: bool) -> tuple[CallOptions, dict[str, Any]]:
    """The call's own options, and the provider parameters that go to LiteLLM unchanged."""
    for name, fix in BYPASS.items():
        if name in kwargs:
            raise BadRequestError(f"{name}= is not accepted per call: {fix}; remove the argument "
                                  f"(nothing was sent)")
    if "stream" in kwargs:
        if kwargs["stream"] and not streaming:
            raise BadRequestError("stream=True is not accepted by complete(): use stream(...), an async "
                                  "iterator of text deltas whose .response is the final LLMResponse "
                                  "(nothing was sent)")
    _check_provider_params(kwargs)
    if not (kwargs.keys() & _OWN):
        return _NONE, kwargs
    rest = dict(kwargs)
    rest.pop("stream", None)
    return CallOptions(timeout=_seconds("timeout", rest.pop("timeout", None), "for each try"),
                       stream_idle_timeout=_seconds("stream_idle_timeout", rest.pop("stream_idle_timeout", None),
                                                    "a stream may go without a chunk"),
                       deadline=_seconds("deadline", rest.pop("deadline", None), "for the whole request"),
                       retries=_retries(rest),
                       drop_params=_flag("drop_params", rest.pop("drop_params", None)),
                       priority=_priority(rest.pop("priority", "normal")),
                       fallbacks=_fallbacks(rest.pop("fallbacks", None)),
                       cache=_flag("cache", rest.pop("cache", None)),
                       cache_ttl=_seconds("cache_ttl", rest.pop("cache_ttl", None),
                                          "to keep this answer in the response cache")), rest


_NONE = CallOptions()
_OWN = frozenset({"timeout", "stream_idle_timeout", "deadline", "drop_params", "stream", "priority", "fallbacks",
                  "cache", "cache_ttl", *RETRY_SYNONYMS})


def _seconds(name: str, value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise BadRequestError(f"{name}=: expected a positive number of seconds {what}, got "
                              f"{_show(value)} (nothing was sent)")
    return float(value)


# Provider parameters whose value decides how much a call may use (what its budget and bucket
# reserve) or that LiteLLM would otherwise fail on deep inside: checked before anything is sent.
_COUNTS = ("max_tokens", "max_completion_tokens", "n")
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def _check_provider_params(kwargs: Mapping[str, Any]) -> None:
    for name in _COUNTS:
        value = kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadRequestError(f"{name}=: expected a positive whole number, got {_show(value)}; "
                                  f"pass an int such as {name}={1 if name == 'n' else 512} (nothing was sent)")
    for name in _NUMBERS:
        value = kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value != value):
            raise BadRequestError(f"{name}=: expected a number, got {_show(value)}; pass a float such as "
                                  f"{name}=0.7 (nothing was sent)")


def check_ids(agent_id: Any, thread_id: Any) -> None:
    """``agent_id`` and ``thread_id`` are strings (or None): they key limits, budgets and totals."""
    for name, value in (("agent_id", agent_id), ("thread_id", thread_id)):
        if value is not None and not isinstance(value, str):
            raise BadRequestError(f"{name}=: expected a string (or None), got {_show(value)}; pass "
                                  f"str({name}) (nothing was sent)")


def _retries(rest: dict[str, Any]) -> int | None:
    given = {name: rest.pop(name) for name in RETRY_SYNONYMS if name in rest}
    values = {v for v in given.values() if v is not None}
    for name, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise BadRequestError(f"{name}=: expected a whole number of tries after the first (0 or "
                                  f"more), got {value!r} (nothing was sent)")
    if len(values) > 1:
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise BadRequestError(f"{shown}: these are one option (tries after the first); pass one of them "
                              f"(nothing was sent)")
    return values.pop() if values else None


def _priority(value: Any) -> Priority:
    if value not in PRIORITIES:
        raise BadRequestError(f"priority=: expected one of {', '.join(PRIORITIES)}, got {value!r} "
                              f"(nothing was sent)")
    return value  # type: ignore[no-any-return]


def _fallbacks(value: Any) -> tuple[str, ...]:
    """``fallbacks=``: a list of model names (whether a backend serves each is checked when routing)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise BadRequestError(f"fallbacks=: expected a list of model names such as [\"claude-sonnet-4\"], "
                              f"got {_show(value)} (nothing was sent)")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise BadRequestError(f"fallbacks[{i}]: expected a model name such as \"claude-sonnet-4\", got "
                                  f"{_show(name)} (nothing was sent)")
    return tuple(value)


def _flag(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise BadRequestError(f"{name}=: expected True or False, got {value!r} (nothing was sent)")
    return value


def check_metadata(metadata: Any) -> dict[str, Any]:
    """``metadata=`` as a dict of str to str/int/float/bool (kept on usage events), or BadRequestError."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise BadRequestError(f"metadata=: expected a dict such as {{'org_id': 'acme'}}, got {_show(metadata)} "
                              f"(nothing was sent)")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise BadRequestError(f"metadata=: keys must be strings, got the key {_show(key)}; use "
                                  f"str(key) (nothing was sent)")
        if value is None or not isinstance(value, (str, int, float, bool)):
            raise BadRequestError(f"metadata[{key!r}]: expected a string, number or true/false, got "
                                  f"{_show(value)}; pass a scalar (e.g. json.dumps it) (nothing was sent)")
    return dict(metadata)


def checked(model: Any, messages: Any, agent_id: Any, thread_id: Any, metadata: Any, kwargs: dict[str, Any],
            streaming: bool) -> tuple[CallOptions, dict[str, Any], dict[str, Any]]:
    """All the checks of a call before anything is sent: its options, provider kwargs and metadata."""
    check_call(model, messages)
    check_ids(agent_id, thread_id)
    return (*split_options(kwargs, streaming=streaming), check_metadata(metadata))


def check_call(model: Any, messages: Any) -> None:
    """The model is a non-empty string and the messages a non-empty list in OpenAI form."""
    if not isinstance(model, str) or not model.strip():
        raise BadRequestError(f"model: expected a model name such as \"grok-4.1\", got {_show(model)} "
                              f"(nothing was sent)")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages: expected a non-empty list of {'role': ..., 'content': ...} "
                              f"dicts, got {_show(messages)} (nothing was sent)")
    for i, message in enumerate(messages):
        problem = _message_problem(message)
        if problem:
            raise BadRequestError(f"messages[{i}]{problem} (nothing was sent)")


def _message_problem(message: Any) -> str:
    if not isinstance(message, Mapping):
        return f": expected a dict such as {{'role': 'user', 'content': 'hi'}}, got {_show(message)}"
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        return f".role: expected one of {', '.join(sorted(ROLES))}, got {_show(role)}"
    content = message.get("content")
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return ""        # an assistant turn that only calls tools
        return ".content: required; expected a string or a list of content parts"
    if isinstance(content, str):
        return ""
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                return (f".content[{j}]: expected a content part such as {{'type': 'text', 'text': ...}}, "
                        f"got {_show(part)}")
        return ""
    return f".content: expected a string or a list of content parts, got {_show(content)}"


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, str) else text
