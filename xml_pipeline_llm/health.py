"""What the request loop tells of each try's end, and what it asks before one: backend health.

``Health`` brings together what is learnt from every try:

- the quota the provider reports in its headers (``pacing.py``): handed to the
  backend's gate, which paces calls to it;
- how the try ended, for the backend's circuit breaker (``circuit.py``);
- how long it took, for a strategy that picks by latency (``strategies.LowestLatency``).

The loop calls ``answered`` when a provider answer (or error) comes back,
``ended`` when a try ends, and ``blocked``/``admit`` when it picks a backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import _litellm
from .circuit import Breakers, MemoryBreakers
from .pacing import Pacer


class Health:
    def __init__(self, gates: Mapping[str, Any], breakers: Breakers | None = None,
                 strategy: Any = None) -> None:
        self.pacer = Pacer(gates)
        self.breakers: Breakers = breakers if breakers is not None else MemoryBreakers({})
        self._observe = getattr(strategy, "observe", None)

    def answered(self, backend: str, answer: Any, seq: int = 0) -> None:
        """A provider's answer, stream or error came back (to the gate's call ``seq``): pace the
        backend by the quota it reports."""
        headers = _litellm.provider_headers(answer)
        if headers:
            self.pacer.answered(backend, headers, seq)

    def ended(self, backend: str, model: str, kind: str | None, seconds: float | None = None) -> None:
        """A try that reached ``backend`` ended (``kind`` None: success, in ``seconds``; else its error kind)."""
        self.breakers.record(backend, kind)
        if kind is None and seconds is not None and self._observe is not None:
            self._observe(backend, model, seconds)

    async def cooldowns(self, cooling: dict[str, float], backends: Iterable[str]) -> dict[str, float]:
        """``cooling`` with the backends whose circuit is open (as long as it stays open)."""
        blocked = await self.breakers.blocked(backends)
        for name, left in blocked.items():
            cooling[name] = max(cooling.get(name, 0.0), left)
        return cooling

    async def admit(self, backend: str) -> bool:
        return await self.breakers.admit(backend)

    def circuit(self, backend: str) -> str:
        return self.breakers.state(backend)
