"""OpenAI's chat-completions body <-> the router's call, and the response and chunks back.

A request body is split into what the router takes as its own (agent,
thread, metadata and the per-call options ``timeout``, ``retries``,
``fallbacks``, ``priority``, ``drop_params``, ``deadline``, ``stream_idle_timeout``, ``cache``,
``cache_ttl``) and the provider
parameters that pass through in OpenAI form (temperature, max_tokens, tools,
...).  Headers add ``X-Agent-Id``, ``X-Thread-Id``, ``X-Priority`` and
``X-Metadata-<key>``; the key's own metadata wins over the caller's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._litellm import strip_route
from ..response import LLMResponse
from .auth import Identity
from .errors import bad_request, forbidden

#: body fields the gateway itself reads (not sent to the provider)
OWN_FIELDS = ("model", "messages", "stream", "stream_options", "user", "metadata", "thread_id", "agent_id")
#: the package's per-call options, accepted as extra body fields
OPTIONS = ("timeout", "retries", "num_retries", "max_retries", "fallbacks", "priority", "drop_params",
           "deadline", "stream_idle_timeout", "cache", "cache_ttl")
METADATA_HEADER = "x-metadata-"


@dataclass
class Call:
    """One chat-completions request as the router's arguments."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    agent_id: str | None
    thread_id: str | None
    metadata: dict[str, Any]
    kwargs: dict[str, Any]


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or 400 saying what is wrong with it."""
    if not raw:
        raise bad_request("empty request body: expected a JSON object such as "
                          '{"model": "grok-4.1", "messages": [{"role": "user", "content": "hi"}]}')
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"expected a JSON object as the request body, got a {type(body).__name__}")
    return body


def to_call(body: dict[str, Any], headers: Mapping[str, str], identity: Identity) -> Call:
    """The router call for a chat-completions body; 400/403 for what cannot be one."""
    model, messages, stream, options = _shape(body)
    for name in [model, *_fallbacks(body.get("fallbacks"))]:
        if not identity.allows(name):
            raise forbidden(f"model {name!r} is not allowed for this key (allowed: "
                            f"{', '.join(identity.models or ())})", "model_not_allowed")
    agent, thread = _who(body, headers, identity)
    kwargs = {k: v for k, v in body.items() if k not in OWN_FIELDS}
    if "priority" not in kwargs and headers.get("x-priority"):
        kwargs["priority"] = headers["x-priority"].strip().lower()
    return Call(model, messages, stream, bool(options.get("include_usage")), agent, thread,
                _metadata(body.get("metadata"), headers, identity), kwargs)


def _shape(body: dict[str, Any]) -> tuple[str, list[Any], bool, dict[str, Any]]:
    """The body's model, messages, stream flag and stream_options, checked (400 for a wrong one)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request('model: required; expected a model name or alias such as "grok-4.1"', "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: required; expected a non-empty list of {\"role\": ..., \"content\": ...}",
                          "messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream: expected true or false, got {json.dumps(stream)}", "stream")
    if body.get("n", 1) not in (1, None):
        raise bad_request(f"n: only one choice per request is served here, got {json.dumps(body['n'])}; send "
                          f"several requests instead", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options: expected an object such as {\"include_usage\": true}", "stream_options")
    return model, messages, bool(stream), options


def _who(body: dict[str, Any], headers: Mapping[str, str], identity: Identity) -> tuple[str | None, str | None]:
    """The call's agent (as the key allows it) and thread, from the headers or the body."""
    named = headers.get("x-agent-id") or body.get("agent_id")
    if identity.agent == "*":           # the body's user names the agent only under a "*" key
        named = named or body.get("user")
    if named is not None and not isinstance(named, str):
        raise bad_request("agent_id / user: expected a string (the agent id)", "user")
    thread = headers.get("x-thread-id") or body.get("thread_id")
    if thread is not None and not isinstance(thread, str):
        raise bad_request("thread_id: expected a string", "thread_id")
    return identity.agent_for(named), thread or None


def _fallbacks(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _metadata(body: Any, headers: Mapping[str, str], identity: Identity) -> dict[str, Any]:
    """Body ``metadata``, then ``X-Metadata-<key>`` headers, then the key's own (which win)."""
    if body is not None and not isinstance(body, dict):
        raise bad_request("metadata: expected an object of strings, numbers or true/false, such as "
                          '{"org_id": "acme"}', "metadata")
    out = dict(body or {})
    for name, value in headers.items():
        if name.startswith(METADATA_HEADER) and len(name) > len(METADATA_HEADER):
            out[name[len(METADATA_HEADER):]] = value
    out.update(identity.metadata)
    return out


# ------------------------------------------------------------------ responses

def usage_body(usage: Mapping[str, int]) -> dict[str, Any]:
    """LLMResponse.usage in OpenAI's form, with the cached and reasoning tokens' details."""
    return {"prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0) or 0},
            "completion_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens", 0) or 0}}


def tool_call(tc: Mapping[str, Any]) -> dict[str, Any]:
    fn = tc.get("function") or {}
    return {"id": tc.get("id") or "", "type": "function",
            "function": {"name": fn.get("name") or "", "arguments": fn.get("arguments") or ""}}


def finish_reason(resp: LLMResponse) -> str:
    if resp.finish_reason:
        return resp.finish_reason
    return "tool_calls" if resp.tool_calls else "stop"


def completion(resp: LLMResponse, request_id: str, created: int | None = None) -> dict[str, Any]:
    """The ``chat.completion`` object for a response."""
    message: dict[str, Any] = {"role": "assistant", "content": resp.content if resp.content or not resp.tool_calls
                               else None, "refusal": None}
    if resp.tool_calls:
        message["tool_calls"] = [tool_call(tc) for tc in resp.tool_calls]
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion",
            "created": int(time.time()) if created is None else created, "model": resp.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(resp), "logprobs": None}],
            "usage": usage_body(resp.usage), "system_fingerprint": None}


class ChunkWriter:
    """LiteLLM's stream chunks as OpenAI ``chat.completion.chunk`` SSE events, one id for the stream."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.model = model
        self.finished = False
        self._role_sent = False

    def event(self, chunk: Any) -> bytes | None:
        """The SSE event for one provider chunk (None: nothing to send, e.g. the provider's usage chunk)."""
        choices = getattr(chunk, "choices", None)
        if not choices:
            return None
        choice = choices[0]
        delta_in = getattr(choice, "delta", None)
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        content = getattr(delta_in, "content", None) if delta_in is not None else None
        if content:
            delta["content"] = content
        calls = getattr(delta_in, "tool_calls", None) if delta_in is not None else None
        if calls:
            delta["tool_calls"] = [_delta_call(tc) for tc in calls]
        reason = getattr(choice, "finish_reason", None)
        if reason:
            self.finished = True
        if not delta and not reason:
            return None
        model = getattr(chunk, "model", None)
        if model:
            self.model = strip_route(model)
        return self._sse([{"index": 0, "delta": delta, "finish_reason": reason or None, "logprobs": None}])

    def last(self, resp: LLMResponse | None, include_usage: bool) -> bytes:
        """The closing events: a finish reason if none was sent, the usage chunk if asked, ``[DONE]``."""
        out = b""
        if not self.finished:
            reason = finish_reason(resp) if resp is not None else "stop"
            delta: dict[str, Any] = {} if self._role_sent else {"role": "assistant"}
            out += self._sse([{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}])
        if include_usage and resp is not None:
            out += self._sse([], usage_body(resp.usage))
        return out + b"data: [DONE]\n\n"

    def _sse(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "system_fingerprint": None, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _delta_call(tc: Any) -> dict[str, Any]:
    fn = getattr(tc, "function", None)
    out: dict[str, Any] = {"index": getattr(tc, "index", 0) or 0}
    if getattr(tc, "id", None):
        out["id"] = tc.id
        out["type"] = "function"
    if fn is not None:
        f: dict[str, Any] = {}
        if getattr(fn, "name", None):
            f["name"] = fn.name
        if getattr(fn, "arguments", None) is not None:
            f["arguments"] = fn.arguments
        out["function"] = f
    return out
