"""Which backend takes the next try, over every model of the request.

``pick(req, cooling, strategy, gates)`` looks at the models of the request's
chain in order (an alias or ``fallbacks=`` has several) and returns the model
to use and its backend:

1. the first model with a backend that is ready (not cooling down, not
   dropped) and has not failed a try of this request: the strategy
   (``strategies.py``) picks among those, preferring the ones that can start
   now (``has_capacity``: not out of ``rate_limit_rpm`` headroom);
2. else the first model with a ready backend that failed before (the usual
   retry of a backend whose cooldown is over);
3. else None: every backend of every model left cools down, and the request
   loop waits (``retry.py`` says how long).

So when every backend of the first model has failed, been dropped or is
cooling down, the next model is tried at once.  Nothing here waits or changes
the request; the loop applies the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends import ResolvedBackend
    from .request import Request
    from .state import BackendGate
    from .strategies import Strategy

log = logging.getLogger("xml_pipeline_llm")


def pick(req: Request, cooling: Mapping[str, float], strategy: Strategy,
         gates: Mapping[str, BackendGate]) -> tuple[int, ResolvedBackend] | None:
    """(the place of the model in the chain, the backend) for the next try; None: all cool down."""
    live = req.live()
    for fresh_only in (True, False):
        for i, step in live:
            ready = [b for b in step.pool()
                     if b.name not in cooling and not (fresh_only and b.name in step.failed)]
            if not ready:
                continue
            able = [b for b in ready if gates[b.name].has_capacity]
            chosen = strategy.pick(able or ready, step.candidates, req.turn, lambda b: gates[b.name].load)
            log.debug("%s: try %d -> %s/%s (ready %s; cooling %s)", req.name, len(req.attempts) + 1,
                      step.model, chosen.name, [b.name for b in able or ready], sorted(cooling))
            return i, chosen
    return None
