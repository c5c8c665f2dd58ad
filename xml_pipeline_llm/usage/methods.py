"""The usage API of ``LLMRouter`` (a mixin over its ``_ledger``)."""

from __future__ import annotations

from .events import EXPORTS, AgentUsage, UsageEvent, check_by
from .export import write_csv
from .ledger import UsageLedger


class UsageMethods:
    """The usage API of ``LLMRouter``, over its ``_ledger``."""

    _ledger: UsageLedger

    def usage_events(self) -> list[UsageEvent]:
        """The usage events this router recorded (the newest 100,000), oldest first."""
        return list(self._ledger.events())

    def get_agent_usage(self, agent_id: str | None) -> AgentUsage:
        """Totals for one agent (all zeros for an agent never seen)."""
        return self._ledger.get("agent", agent_id)

    def get_all_usage(self, by: str = "agent") -> dict[str, AgentUsage]:
        """Totals per agent (or per ``model``, ``backend``, ``thread``)."""
        return self._ledger.totals(check_by(by))

    def reset_agent_usage(self, agent_id: str | None = None) -> None:
        """Forget one agent's totals, or all totals; a durable ledger keeps its rows."""
        self._ledger.reset(agent_id)

    def export_usage_csv(self, path: str, by: str = "agent") -> int:
        """Write usage as CSV grouped ``by`` agent, model, backend, thread, or one row per ``event``."""
        if check_by(by, EXPORTS) == "event":
            return write_csv(path, by, events=self._ledger.events())
        return write_csv(path, by, totals=self._ledger.totals(by))
