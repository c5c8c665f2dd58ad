"""Request parsing and response/stream builders for each provider wire format.

Three formats: ``openai`` (also xAI), ``anthropic`` and ``ollama``. Everything
here is pure (dicts and bytes in, dicts and bytes out) so the server stays a
thin layer of HTTP plumbing and these shapes can be read side by side.

The reply and token rules are documented in the package docstring.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

FORMATS = ("openai", "anthropic", "ollama")
PER_MESSAGE_TOKENS = 3
REPLY_PREFIX_WORDS = 5

JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream"
NDJSON_TYPE = "application/x-ndjson"


@dataclass(frozen=True)
class Reply:
    """The deterministic answer to one request, before it is put on the wire."""

    model: str
    text: str
    tool_name: str | None
    tool_input: str
    finish: str  # "stop", "length" or "tool"
    prompt_tokens: int              # every input token, cached or not
    completion_tokens: int          # reasoning tokens included
    cached_tokens: int = 0          # of the prompt, read from the prompt cache
    cache_write_tokens: int = 0     # of the prompt, written to the prompt cache (Anthropic reports these)
    reasoning_tokens: int = 0       # of the completion (OpenAI reports these)

    @property
    def tool_arguments(self) -> str:
        """Arguments as the JSON string OpenAI carries them in."""
        return json.dumps({"input": self.tool_input})


# ---------------------------------------------------------------- parsing


def content_text(content: Any) -> str:
    """Plain text of a message content: string, or text parts of a block list.

    Anthropic ``tool_result`` blocks count by their own text content, so a
    tool loop's input is measured too; images and tool calls count nothing.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            parts.append(content_text(block.get("content")))
    return " ".join(p for p in parts if p)


def words(text: str) -> list[str]:
    """Whitespace-separated words: the simulator's unit of 'token'."""
    return text.split()


def prompt_tokens(body: dict[str, Any]) -> int:
    """Words of every message content + 3 per message + words of a top-level system."""
    messages = body.get("messages") or []
    total = sum(PER_MESSAGE_TOKENS + len(words(content_text(m.get("content")))) for m in messages
                if isinstance(m, dict))
    return total + len(words(content_text(body.get("system"))))


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def _answers_tool_result(messages: list[Any]) -> bool:
    """True when the last message returns a tool result: then reply in text.

    Without this an agent loop against the simulator would never end.
    """
    if not messages or not isinstance(messages[-1], dict):
        return False
    last = messages[-1]
    if last.get("role") == "tool":
        return True
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def _tool_name(fmt: str, body: dict[str, Any]) -> str | None:
    """Name of the tool to call, or None when no tool call is wanted."""
    tools = body.get("tools") or []
    if not tools or _answers_tool_result(body.get("messages") or []):
        return None
    choice = body.get("tool_choice")
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    forced = _forced_tool(choice)
    if forced:
        return forced
    first = tools[0] if isinstance(tools[0], dict) else {}
    if fmt == "anthropic":
        return first.get("name") or "tool"
    return (first.get("function") or {}).get("name") or "tool"


def _forced_tool(choice: Any) -> str | None:
    """Tool named by tool_choice (OpenAI function form or Anthropic tool form)."""
    if not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool":
        return choice.get("name")
    return (choice.get("function") or {}).get("name")


def _max_tokens(fmt: str, body: dict[str, Any]) -> int | None:
    if fmt == "ollama":
        value = (body.get("options") or {}).get("num_predict")
    elif fmt == "anthropic":
        value = body.get("max_tokens")
    else:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and value >= 0 else None


def plan_reply(fmt: str, backend: str, body: dict[str, Any]) -> Reply:
    """Decide the deterministic reply (text or tool call) and its token counts."""
    messages = body.get("messages") or []
    user_text = _last_user_text(messages)
    prompt = prompt_tokens(body)
    model = str(body.get("model") or "simulated")
    tool = _tool_name(fmt, body)
    if tool is not None:
        args = json.dumps({"input": user_text})
        return Reply(model, "", tool, user_text, "tool", prompt, len(words(args)))
    reply_words = f"Hello from {backend}: {' '.join(words(user_text)[:REPLY_PREFIX_WORDS])}".split()
    limit = _max_tokens(fmt, body)
    finish = "stop"
    if limit is not None and limit < len(reply_words):
        reply_words, finish = reply_words[:limit], "length"
    return Reply(model, " ".join(reply_words), None, "", finish, prompt, len(reply_words))


def with_details(fmt: str, reply: Reply, details: Any) -> Reply:
    """``reply`` with the prompt-cache and reasoning figures ``details`` (a ``UsageDetails``) asks for.

    Each format reports what its provider does: OpenAI (and xAI) cached input and
    reasoning tokens, Anthropic cache reads and writes; Ollama none.
    """
    if fmt == "ollama":
        return reply
    cached = int(reply.prompt_tokens * details.cached)
    if fmt == "anthropic":
        return replace(reply, cached_tokens=cached,
                       cache_write_tokens=int(reply.prompt_tokens * details.cache_write))
    reasoning = details.reasoning_tokens
    return replace(reply, cached_tokens=cached, reasoning_tokens=reasoning,
                   completion_tokens=reply.completion_tokens + reasoning)


def wants_stream(body: dict[str, Any], fmt: str) -> bool:
    """Ollama streams unless told not to; the others only when asked."""
    default = fmt == "ollama"
    return bool(body.get("stream", default))


def usage_in_stream(fmt: str, body: dict[str, Any]) -> bool:
    """Whether a stream reports usage; OpenAI only with include_usage, like the real API."""
    if fmt != "openai":
        return True
    return bool((body.get("stream_options") or {}).get("include_usage"))


def word_pieces(text: str) -> list[str]:
    """Split keeping trailing whitespace, so joined pieces == text."""
    return re.findall(r"\s*\S+\s*", text) if text else []


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------- OpenAI


def _openai_usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool": "tool_calls"}


def openai_json(reply: Reply) -> dict[str, Any]:
    """A CreateChatCompletionResponse."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None, "annotations": []}
    if reply.tool_name:
        message["content"] = None
        message["tool_calls"] = [{"id": _new_id("call_"), "type": "function",
                                  "function": {"name": reply.tool_name, "arguments": reply.tool_arguments}}]
    return {
        "id": _new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
        "model": reply.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _OPENAI_FINISH[reply.finish]}],
        "usage": _openai_usage(reply), "service_tier": "default", "system_fingerprint": "fp_simulator",
    }


def _sse_data(payload: Any) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def openai_stream(reply: Reply, include_usage: bool) -> list[bytes]:
    """CreateChatCompletionStreamResponse chunks, one delta per word, then [DONE]."""
    base = {"id": _new_id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": reply.model, "system_fingerprint": "fp_simulator", "service_tier": "default"}
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse_data({**base, "choices": [choice]})

    if reply.tool_name:
        head = {"role": "assistant", "content": None, "tool_calls": [{
            "index": 0, "id": _new_id("call_"), "type": "function",
            "function": {"name": reply.tool_name, "arguments": ""}}]}
        body = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                for piece in word_pieces(reply.tool_arguments)]
    else:
        head = {"role": "assistant", "content": "", "refusal": None}
        body = [chunk({"content": piece}) for piece in word_pieces(reply.text)]
    out = [chunk(head), *body, chunk({}, _OPENAI_FINISH[reply.finish])]
    if include_usage:
        out.append(_sse_data({**base, "choices": [], "usage": _openai_usage(reply)}))
    return [*out, b"data: [DONE]\n\n"]


# ---------------------------------------------------------------- Anthropic

_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use"}


def _anthropic_usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
    """A ``Usage``: ``input_tokens`` are the uncached ones (total input = the three input counts)."""
    return {**_anthropic_input(reply), "output_tokens": output_tokens,
            "cache_creation": {"ephemeral_5m_input_tokens": reply.cache_write_tokens,
                               "ephemeral_1h_input_tokens": 0},
            "server_tool_use": None, "service_tier": "standard", "inference_geo": None}


def _anthropic_input(reply: Reply) -> dict[str, int]:
    return {"input_tokens": reply.prompt_tokens - reply.cached_tokens - reply.cache_write_tokens,
            "cache_creation_input_tokens": reply.cache_write_tokens,
            "cache_read_input_tokens": reply.cached_tokens}


def _anthropic_blocks(reply: Reply) -> list[dict[str, Any]]:
    if reply.tool_name:
        return [{"type": "tool_use", "id": _new_id("toolu_"), "name": reply.tool_name,
                 "input": {"input": reply.tool_input}}]
    return [{"type": "text", "text": reply.text}]


def anthropic_json(reply: Reply) -> dict[str, Any]:
    """A Messages API ``Message``."""
    return {
        "id": _new_id("msg_"), "type": "message", "role": "assistant", "model": reply.model,
        "content": _anthropic_blocks(reply), "stop_reason": _ANTHROPIC_STOP[reply.finish],
        "stop_sequence": None, "usage": _anthropic_usage(reply, reply.completion_tokens),
    }


def _sse_event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def anthropic_stream(reply: Reply) -> list[bytes]:
    """message_start (input usage) .. content_block_* .. message_delta (cumulative usage) .. message_stop."""
    message = {**anthropic_json(reply), "content": [], "stop_reason": None,
               "usage": _anthropic_usage(reply, 1)}
    if reply.tool_name:
        block = {**_anthropic_blocks(reply)[0], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in word_pieces(reply.tool_arguments)]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in word_pieces(reply.text)]
    return [
        _sse_event("message_start", {"type": "message_start", "message": message}),
        _sse_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        _sse_event("ping", {"type": "ping"}),
        *[_sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
          for d in deltas],
        _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _ANTHROPIC_STOP[reply.finish], "stop_sequence": None},
            "usage": {**_anthropic_input(reply), "output_tokens": reply.completion_tokens,
                      "server_tool_use": None}}),
        _sse_event("message_stop", {"type": "message_stop"}),
    ]


# ---------------------------------------------------------------- Ollama

_OLLAMA_DONE = {"stop": "stop", "length": "length", "tool": "stop"}


def _ollama_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ollama_message(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if reply.tool_name:
        message["tool_calls"] = [{"id": _new_id("call_"), "function": {
            "index": 0, "name": reply.tool_name, "arguments": {"input": reply.tool_input}}}]
    return message


def _ollama_done(reply: Reply, message: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": reply.model, "created_at": _ollama_now(), "message": message,
        "done": True, "done_reason": _OLLAMA_DONE[reply.finish],
        "total_duration": 1_000_000, "load_duration": 1_000, "prompt_eval_count": reply.prompt_tokens,
        "prompt_eval_duration": 1_000, "eval_count": reply.completion_tokens, "eval_duration": 1_000,
    }


def ollama_json(reply: Reply) -> dict[str, Any]:
    """A non-streamed /api/chat answer."""
    return _ollama_done(reply, _ollama_message(reply))


def ollama_stream(reply: Reply) -> list[bytes]:
    """NDJSON: one line per word (done:false), then a done:true line with the counts."""
    def line(payload: dict[str, Any]) -> bytes:
        return (json.dumps(payload) + "\n").encode()

    def partial(message: dict[str, Any]) -> bytes:
        return line({"model": reply.model, "created_at": _ollama_now(), "message": message, "done": False})

    if reply.tool_name:
        parts = [partial(_ollama_message(reply))]
    else:
        parts = [partial({"role": "assistant", "content": p}) for p in word_pieces(reply.text)]
    return [*parts, line(_ollama_done(reply, {"role": "assistant", "content": ""}))]


def ollama_show(model: str) -> dict[str, Any]:
    """Plausible /api/show: LiteLLM reads ``template`` and ``model_info``."""
    return {
        "license": "simulated", "modelfile": f"FROM {model}\n", "parameters": "stop \"<|eot_id|>\"",
        "template": "{{ if .Tools }}tools{{ end }}{{ .Prompt }}",
        "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                    "parameter_size": "8.0B", "quantization_level": "Q4_K_M"},
        "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
        "capabilities": ["completion", "tools"], "modified_at": _ollama_now(),
    }


def ollama_tags() -> dict[str, Any]:
    """Plausible /api/tags listing one model."""
    return {"models": [{
        "name": "llama3:latest", "model": "llama3:latest", "modified_at": _ollama_now(), "size": 4_661_224_676,
        "digest": "0" * 64, "details": {"format": "gguf", "family": "llama", "families": ["llama"],
                                        "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}}]}


def openai_models() -> dict[str, Any]:
    """GET /v1/models."""
    ids = ("gpt-4o", "gpt-4o-mini", "grok-4.1")
    return {"object": "list", "data": [{"id": i, "object": "model", "created": 1_700_000_000,
                                        "owned_by": "simulator"} for i in ids]}


# ---------------------------------------------------------------- errors and broken bodies

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None), 404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", None), 422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
    422: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error",
}


def error_body(fmt: str, status: int, message: str) -> dict[str, Any]:
    """The provider's own error envelope, so LiteLLM's error parsing is exercised."""
    if fmt == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": _new_id("req_")}
    if fmt == "ollama":
        return {"error": message}
    kind, code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def malformed_body(fmt: str, stream: bool) -> tuple[bytes, str]:
    """A truncated JSON document (and its content-type) the client cannot parse."""
    if fmt == "ollama":
        return b'{"model": "', NDJSON_TYPE if stream else JSON_TYPE
    prefix = b'{"id": "msg_' if fmt == "anthropic" else b'{"id": "chatcmpl-'
    if not stream:
        return prefix, JSON_TYPE
    event = b"event: message_start\n" if fmt == "anthropic" else b""
    return event + b"data: " + prefix + b"\n\n", SSE_TYPE


def missing_fields_body(fmt: str, reply: Reply, stream: bool) -> tuple[bytes, str]:
    """Valid JSON lacking the fields a client needs (choices / content / message)."""
    if fmt == "anthropic":
        doc: dict[str, Any] = {"id": _new_id("msg_"), "type": "message", "role": "assistant", "model": reply.model}
        if stream:
            return _sse_event("message_start", {"type": "message_start", "message": doc}), SSE_TYPE
        return json.dumps(doc).encode(), JSON_TYPE
    if fmt == "ollama":
        doc = {"model": reply.model, "created_at": _ollama_now(), "done": True}
        return (json.dumps(doc) + "\n").encode(), NDJSON_TYPE if stream else JSON_TYPE
    doc = {"id": _new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
           "model": reply.model}
    if stream:
        return _sse_data({**doc, "object": "chat.completion.chunk"}) + b"data: [DONE]\n\n", SSE_TYPE
    return json.dumps(doc).encode(), JSON_TYPE
