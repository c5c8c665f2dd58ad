"""The demo's short acts, after the strategies: a runaway agent stopped by its budget, fair shares
for a light agent beside a greedy one, and an agent loop reading its prompt from the provider's cache.

Each is given the demo's ``llm:`` block (failover, on the simulator) and makes its own router.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import TYPE_CHECKING, Any

from ..budgets import BudgetExceededError
from ..config import load_config
from ..errors import LoopDetectedError
from ..router import LLMRouter
from ..strategies import STRATEGY_NAMES as STRATEGY_NAMES
from .output import make_table, show, when_text

if TYPE_CHECKING:
    from rich.console import Console




RUNAWAY = "runaway"
RUNAWAY_BUDGET = 250     # tokens a day: a few calls, then it is stopped


async def run_budget(failover: dict[str, Any]) -> tuple[int, str, list[Any]]:
    """An agent that loops on calls until its daily token budget stops it (before anything is sent)."""
    block = {**failover,
             "budgets": [{"scope": "agent", "match": RUNAWAY, "max_tokens": RUNAWAY_BUDGET, "window": "1d"}]}
    router = LLMRouter(load_config({"llm": block}))
    sent, stopped = 0, ""
    try:
        for _ in range(50):
            try:
                await router.complete("claude-sonnet-4-5", [{"role": "user", "content": "keep going"}],
                                      agent_id=RUNAWAY, max_tokens=100)
                sent += 1
            except BudgetExceededError as exc:
                stopped = str(exc)
                break
        return sent, stopped, router.budgets()
    finally:
        await router.aclose()


def report_budget(outcome: tuple[int, str, list[Any]], console: Console) -> None:
    sent, stopped, statuses = outcome
    console.print(f"Budget: agent {RUNAWAY!r} may spend {RUNAWAY_BUDGET} tokens a day; it made {sent} "
                  f"calls, then was stopped before sending:")
    console.print(f"BudgetExceededError: {stopped}", style="yellow")
    table = make_table(title="Budgets")
    for name, justify in (("Scope", "left"), ("Key", "left"), ("Used / limit", "right"),
                          ("Reserved", "right"), ("Resets (UTC)", "left")):
        table.add_column(name, justify=justify)
    for b in statuses:
        table.add_row(b.scope, b.key or "-", f"{b.used_tokens:,} / {b.limit_tokens:,} tokens",
                      f"{b.reserved_tokens:,}", when_text(b.resets_at) if b.resets_at else "never")
    show(console, table)


async def run_loop(failover: dict[str, Any]) -> str:
    """An agent stuck in a loop (the same request again and again) is stopped by llm.guards."""
    router = LLMRouter(load_config({"llm": {**failover, "guards": {"repeat_limit": 3, "repeat_window": "10m"}}}))
    sent, stopped = 0, ""
    try:
        for _ in range(20):
            try:
                await router.complete("grok-4.3", [{"role": "user", "content": "call the search tool again"}],
                                      agent_id="stuck", thread_id="task-1", max_tokens=16)
                sent += 1
            except LoopDetectedError as exc:
                stopped = f"LoopDetectedError after {exc.count - 1} identical requests in {exc.window:g}s"
                break
    finally:
        await router.aclose()
    return (f"Guards: agent 'stuck' sent the same request in thread task-1 {sent} times, then the next one "
            f"was refused before sending ({stopped}); llm.guards.repeat_limit: 3.")


async def run_greedy(failover: dict[str, Any]) -> str:
    """A greedy agent floods one backend; a light agent's calls wait for its share, not the queue."""
    block = {**failover, "backends": [{**b, "max_concurrent": 2} for b in failover["backends"]
                                      if b["name"] == "openai-main"]}
    router = LLMRouter(load_config({"llm": block}))
    messages = [{"role": "user", "content": "next step"}]
    try:
        flood = [asyncio.ensure_future(router.complete("gpt-4o-mini", messages, agent_id="planner"))
                 for _ in range(GREEDY_CALLS)]
        await asyncio.sleep(0)
        waits = []
        for _ in range(3):
            start = time.perf_counter()
            await router.complete("gpt-4o-mini", messages, agent_id="reviewer")
            waits.append(time.perf_counter() - start)
        queued = router.gate("openai-main").queued
        await asyncio.gather(*flood)
    finally:
        await router.aclose()
    one = statistics.median(waits)
    return (f"Fair shares: 'planner' queued {GREEDY_CALLS} calls on a 2-slot backend; 'reviewer' sent 3, "
            f"each answered in {one:.2f} s (median) with {queued} of the planner's still queued, "
            f"instead of waiting behind all of them.")


GREEDY_CALLS = 30
LOOPER, LOOP_STEPS, LOOP_BACKEND = "looper", 6, "anthropic-main"


async def run_cached(sim: Any, failover: dict[str, Any]) -> str:
    """An agent loop resending its growing prompt: most input is read from the provider's prompt cache.

    The simulator reports Anthropic's cache figures; what the calls would have
    cost without the cache is the same usage priced as uncached input.
    """
    router = LLMRouter(load_config({"llm": failover}))
    messages = [{"role": "system", "content": "You are a careful research agent. " * 150}]
    uncached = 0.0
    try:
        for step in range(LOOP_STEPS):
            if step == 0:       # the first step writes the prompt to the cache
                sim.set_usage_details(LOOP_BACKEND, cache_write=0.9)
            else:               # the later ones read it, and write what is new
                sim.set_usage_details(LOOP_BACKEND, cached=0.9, cache_write=0.05)
            messages.append({"role": "user", "content": f"step {step + 1}: go on with the research"})
            resp = await router.complete("claude-sonnet-4-5", messages, agent_id=LOOPER, max_tokens=64)
            messages.append({"role": "assistant", "content": resp.content})
            plain = {k: resp.usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
            uncached += router.pricing.cost("claude-sonnet-4-5", "anthropic", plain) or 0.0
        u = router.get_agent_usage(LOOPER)
    finally:
        sim.set_usage_details(LOOP_BACKEND)
        await router.aclose()
    cost = u.cost_usd or 0.0
    saved = 1 - cost / uncached if uncached else 0.0
    return (f"Prompt cache: agent {LOOPER!r} made {u.request_count} calls resending a growing prompt; "
            f"{u.cached_tokens:,} of its {u.prompt_tokens:,} input tokens were read from the cache and "
            f"{u.cache_write_tokens:,} written to it. Cost ${cost:.4f} instead of ${uncached:.4f} "
            f"without the cache ({saved:.0%} saved).")
