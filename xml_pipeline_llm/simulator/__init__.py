"""Local provider simulator: real wire formats, deterministic replies, scripted faults.

Why: the router must be tested against LiteLLM's real HTTP code, not mocks,
and without network access. This server speaks each provider's wire format
on 127.0.0.1 so LiteLLM's own request building, parsing, streaming and error
mapping all run for real. It imports only aiohttp and the standard library.

Endpoints (each also under ``/b/<backend>``; unprefixed = backend ``default``):

* ``POST /v1/chat/completions`` - OpenAI / xAI, JSON or SSE (``data: [DONE]``);
  the usage chunk (``choices: []``) is sent only with
  ``stream_options.include_usage`` true, as the real API does.
* ``POST /v1/messages`` - Anthropic Messages, JSON or its event stream.
* ``POST /api/chat`` - Ollama, JSON or NDJSON (streams unless ``stream: false``),
  plus ``POST /api/show``, ``GET /api/tags``, ``GET /api/version``.
* ``GET /v1/models``.

Deterministic content and token rule ("token" = whitespace-separated word):

* reply text = ``"Hello from <backend>: <first 5 words of the last user message>"``,
  cut to ``max_tokens`` words when the limit is smaller (OpenAI ``max_tokens`` /
  ``max_completion_tokens``, Anthropic ``max_tokens``, Ollama
  ``options.num_predict``); then finish_reason ``length`` / stop_reason
  ``max_tokens`` / done_reason ``length``.
* prompt tokens = sum over messages of (3 + words of its text) + words of the
  top-level ``system`` (Anthropic). Text = a string content or the ``text``
  parts of a block list (Anthropic ``tool_result`` text included); images and
  tool calls count 0.
* completion tokens = words of the reply text; for a tool call, words of the
  arguments JSON string ``{"input": "<last user text>"}``.
* tool call: when the request has ``tools`` and ``tool_choice`` is not none,
  the first tool (or the one tool_choice names) is called with arguments
  ``{"input": "<last user text>"}`` - unless the last message is a tool
  result, which is answered in text so agent loops end.
* streams carry one delta per word with trailing spaces kept, so the joined
  deltas equal the full content.

Typical use::

    with run_simulator() as sim:
        sim.script("xai-main", [Fault.status(429, retry_after=2)])
        litellm.completion(model="xai/grok-4.1", api_base=sim.base_url("xai-main", "xai"), ...)
        assert sim.stats("xai-main").requests == 1
"""

from .quota import QuotaStats, WindowStats
from .runner import DEMO_FAULTS, SimulatorThread, run_foreground, run_simulator
from .server import Simulator
from .state import ALL_BACKENDS, BackendStats, Fault, RecordedRequest, UsageDetails

__all__ = [
    "ALL_BACKENDS",
    "DEMO_FAULTS",
    "QuotaStats",
    "BackendStats",
    "Fault",
    "RecordedRequest",
    "Simulator",
    "SimulatorThread",
    "UsageDetails",
    "WindowStats",
    "run_foreground",
    "run_simulator",
]
