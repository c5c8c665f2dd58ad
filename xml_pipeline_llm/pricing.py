"""What a call costs: one place for prices, the cost of a usage and the worst case a budget reserves.

Prices come from LiteLLM's cost map, or from ``llm.pricing`` (model name or
shell pattern -> ``ModelPrice``), and every cost is computed by LiteLLM's own
machinery (``litellm.cost_per_token`` on the provider's full usage), so cache
reads, cache writes and reasoning tokens are priced as the provider bills
them.  An ``llm.pricing`` entry is handed to LiteLLM with each computation as
that model's price (LiteLLM's per-deployment price override), never written
into LiteLLM's process-wide cost map: two routers with different prices for
one model each charge their own.

A ``Pricing`` belongs to one router, built from its config, and its caches
with it: a new router (``configure_router`` with other ``llm.pricing``)
reserves and charges at its own prices from its first call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _litellm
from .providers import matches

if TYPE_CHECKING:
    from .config import ModelPrice

log = logging.getLogger("xml_pipeline_llm")

PER_MTOK = 1e-6
LITELLM = "litellm"            # the price is LiteLLM's cost map's
USER = "llm.pricing"           # the price is the config's
_WARNED: set[str] = set()      # models whose missing price was logged, once per process
_MTOK = 1_000_000


def model_info(price: ModelPrice, provider: str) -> dict[str, Any]:
    """An ``llm.pricing`` entry as LiteLLM model info (USD per token).

    The entry is the model's whole price: a cache read costs ``cached_input_per_mtok``
    and a cache write ``cache_write_per_mtok``, each the input price when not given.
    """
    per_in = price.input_per_mtok * PER_MTOK
    cached = price.cached_input_per_mtok
    write = price.cache_write_per_mtok
    return {"input_cost_per_token": per_in,
            "output_cost_per_token": price.output_per_mtok * PER_MTOK,
            "cache_read_input_token_cost": per_in if cached is None else cached * PER_MTOK,
            "cache_creation_input_token_cost": per_in if write is None else write * PER_MTOK,
            "litellm_provider": provider, "mode": "chat"}


class Pricing:
    """The prices of one router and what its calls cost (USD; None when the model has no price)."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices: dict[str, ModelPrice] = dict(prices or {})
        # (model, provider prefix) -> LiteLLM model info of its llm.pricing entry, or LITELLM, or None
        self._sources: dict[tuple[str, str], dict[str, Any] | str | None] = {}
        # (model, provider prefix) -> (USD per input token at its dearest, USD per output token)
        self._rates: dict[tuple[str, str], tuple[float, float] | None] = {}

    def __repr__(self) -> str:
        return f"Pricing({sorted(self._prices)!r})"

    def user_price(self, model: str) -> ModelPrice | None:
        """The ``llm.pricing`` entry for ``model``: its own name first, else the first pattern matching it."""
        exact = next((p for k, p in self._prices.items() if k.lower() == model.lower()), None)
        return exact or next((p for k, p in self._prices.items() if matches(model, (k,))), None)

    def _source(self, model: str, provider: str) -> dict[str, Any] | str | None:
        key = (model, provider)
        if key in self._sources:
            return self._sources[key]
        price = self.user_price(model)
        source: dict[str, Any] | str | None
        if price is not None:
            source = model_info(price, provider)
        elif _litellm.in_cost_map(model, provider):
            source = LITELLM
        else:
            source = None
            if model not in _WARNED:
                _WARNED.add(model)
                # short: the CLI prints it on an 80-column line
                log.warning("no price for %s on %s: cost unknown; set one in llm.pricing", model, provider)
        self._sources[key] = source
        return source

    def source(self, model: str, provider: str) -> str | None:
        """Where the model's price comes from: ``litellm``, ``llm.pricing`` or None (no price)."""
        found = self._source(model, provider)
        return None if found is None else LITELLM if found == LITELLM else USER

    def priced(self, model: str, provider: str) -> bool:
        return self._source(model, provider) is not None

    def cost(self, model: str, provider: str, usage: Any) -> float | None:
        """What ``usage`` costs on ``model`` called through ``provider`` (LiteLLM's prefix); None: no price.

        ``usage`` is the provider's usage as LiteLLM parsed it (a response's or a
        stream's last chunk's ``usage``), with its cache and reasoning details, or
        a mapping of this package's usage fields.
        """
        source = self._source(model, provider)
        if source is None:
            return None
        info = None if source == LITELLM else source
        try:
            return _litellm.usage_cost(model, provider, usage, info if isinstance(info, dict) else None)
        except Exception as exc:        # LiteLLM could not price this usage: unknown, not 0
            log.debug("pricing %s on %s failed: %s", model, provider, exc)
            return None

    def rates(self, model: str, provider: str) -> tuple[float, float] | None:
        """USD per input token at its dearest (uncached, cache read or cache write) and per output token."""
        key = (model, provider)
        if key not in self._rates:
            rates = None
            uncached = self.cost(model, provider, {"prompt_tokens": _MTOK})
            per_out = self.cost(model, provider, {"completion_tokens": _MTOK})
            if uncached is not None and per_out is not None:
                cache = [self.cost(model, provider, {"prompt_tokens": _MTOK, kind: _MTOK})
                         for kind in ("cached_tokens", "cache_write_tokens")]
                rates = (max(uncached, *(c for c in cache if c is not None)) / _MTOK, per_out / _MTOK)
            self._rates[key] = rates
        return self._rates[key]

    def worst_cost(self, model: str, provider: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """The most a call may cost: every input token at its dearest input price (none read from
        the cache), ``completion_tokens`` at the output price.  None: no price."""
        rates = self.rates(model, provider)
        if rates is None:
            return None
        return prompt_tokens * rates[0] + completion_tokens * rates[1]
