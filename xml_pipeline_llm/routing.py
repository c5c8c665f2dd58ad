"""Which backends may serve a model: model rules, provider prefixes, catch-alls.

``Routes.route(model)`` gives the model name to send and the candidate
backends in file order, cached per model name; no candidate is a
``ModelNotFoundError`` naming every backend and what it serves.
"""

from __future__ import annotations

from collections.abc import Sequence

from .backends import ResolvedBackend
from .errors import ModelNotFoundError
from .providers import lookup, matches


class Routes:
    """The candidates for each model name, worked out once per name."""

    def __init__(self, backends: Sequence[ResolvedBackend],
                 skipped: Sequence[tuple[str, str]] = ()) -> None:
        self.backends = list(backends)
        self.skipped = list(skipped)
        self._cache: dict[str, tuple[str, list[ResolvedBackend]]] = {}

    def route(self, model: str) -> tuple[str, list[ResolvedBackend]]:
        """The model name to send and the backends that may serve it (file order)."""
        found = self._cache.get(model)
        if found is None:
            found = self._cache[model] = self._route(model)
        return found

    def _route(self, model: str) -> tuple[str, list[ResolvedBackend]]:
        pool, bare = self.backends, model
        prefix, sep, rest = model.partition("/")
        if sep and rest and (lookup(prefix) is not None or any(b.name == prefix for b in self.backends)):
            # a provider (or backend) prefix restricts the candidates, even to none
            pool, bare = [b for b in self.backends if prefix in (b.provider.name, b.name)], rest
        ruled = [b for b in pool if not b.catch_all and matches(bare, b.model_rule)]
        chosen = ruled or [b for b in pool if b.catch_all]
        if not chosen:
            served = "; ".join(f"{b.name} ({b.provider.name}): {b.describe_models()}" for b in self.backends)
            skipped = "".join(f"; {name} skipped ({why})" for name, why in self.skipped)
            raise ModelNotFoundError(
                f'no backend serves model "{model}". Configured: {served}{skipped}. '
                f"Fix the model name, or add it to a backend's supported_models")
        return bare, chosen
