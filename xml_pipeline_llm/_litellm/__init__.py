"""Everything that touches LiteLLM lives here, imported on first use.

``import litellm`` takes seconds, so the package imports this module only when
a router makes its first call.  Before LiteLLM is imported its run-time fetches
(cost map, Anthropic beta headers) are switched off unless the user chose
otherwise, so nothing leaves the machine except calls to configured backends.

The rest of the package imports LiteLLM's work only from here: ``load.py`` (the import,
the callback, which tries were sent), ``deployments.py`` (the model list and the call),
``measure.py`` (tokens, context windows, costs, responses), ``streams.py`` (a stream's end),
``inline.py`` (the per-call setup on the loop's thread, for the gateway),
``causes.py`` (why a call failed).
"""

from .causes import (
    cause,
    unsupported_params,
)
from .deployments import (
    Deployments,
    build_router,
    deployment,
)
from .inline import InlineSetup
from .load import (
    forget,
    load,
    new_try,
    register,
    sent,
)
from .measure import (
    call_id,
    context_window,
    in_cost_map,
    litellm_usage,
    provider_headers,
    strip_route,
    text_tokens,
    to_response,
    token_estimate,
    usage_cost,
    usage_of,
)
from .streams import ProviderEnded, ending, tap

__all__ = [
    "Deployments",
    "InlineSetup",
    "ProviderEnded",
    "build_router",
    "call_id",
    "cause",
    "context_window",
    "deployment",
    "ending",
    "forget",
    "in_cost_map",
    "litellm_usage",
    "provider_headers",
    "load",
    "new_try",
    "register",
    "sent",
    "strip_route",
    "tap",
    "text_tokens",
    "to_response",
    "token_estimate",
    "unsupported_params",
    "usage_cost",
    "usage_of",
]
