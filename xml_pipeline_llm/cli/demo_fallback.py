"""The demo's last act: a fallback across models while one simulated provider is down.

An alias ``smart: [grok-4.3, claude-sonnet-4-5]`` over ``xai-main`` and
``anthropic-main`` only (no gateway serving both), so nothing but the next
model can answer while ``xai-main`` answers every call with 503 for
``OUTAGE`` seconds.  Requests go out at a steady pace: during the outage
Claude answers them at once (no waiting for xai's cooldown), afterwards
they go back to Grok.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import load_config
from ..errors import BackendError
from ..router import LLMRouter
from ..simulator import Fault
from .output import make_table, show

if TYPE_CHECKING:
    from rich.console import Console

ALIAS = "smart"
CHAIN = ("grok-4.3", "claude-sonnet-4-5")
DOWN = "xai-main"
OUTAGE = 1.0        # seconds xai-main is down
REQUESTS = 18
PACE = 0.1          # seconds between requests


@dataclass
class FallbackResult:
    during: dict[str, int] = field(default_factory=dict)    # model -> answers while DOWN was down
    after: dict[str, int] = field(default_factory=dict)     # model -> answers after it came back
    errors: int = 0
    slowest: float = 0.0                                     # seconds, the slowest request
    seconds: float = 0.0


def fallback_block(block: dict[str, Any]) -> dict[str, Any]:
    """The demo's ``llm:`` block with the alias, and only the providers' own backends."""
    backends = [b for b in block["backends"] if b["name"] in (DOWN, "anthropic-main")]
    return {**block, "strategy": "failover", "models": {ALIAS: list(CHAIN)}, "backends": backends}


async def run_fallback(sim: Any, block: dict[str, Any]) -> FallbackResult:
    router = LLMRouter(load_config({"llm": fallback_block(block)}))
    result = FallbackResult()
    sim.set_fault_rate(DOWN, 1.0, [Fault.status(503, retry_after=0.3)], seed=1)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    back = loop.call_later(OUTAGE, sim.set_fault_rate, DOWN, 0.0, [], None)

    async def one(i: int) -> None:
        await asyncio.sleep(i * PACE)
        sent = time.perf_counter()
        down = sent - start < OUTAGE
        try:
            resp = await router.complete(ALIAS, [{"role": "user", "content": f"Fallback check {i + 1}."}],
                                         agent_id="fallback-demo", max_tokens=16)
        except BackendError:
            result.errors += 1
            return
        finally:
            result.slowest = max(result.slowest, time.perf_counter() - sent)
        phase = result.during if down else result.after
        phase[resp.model] = phase.get(resp.model, 0) + 1

    try:
        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    finally:
        back.cancel()
        sim.set_fault_rate(DOWN, 0.0, [], None)
        result.seconds = time.perf_counter() - start
        await router.aclose()
    return result


def report_fallback(result: FallbackResult, console: Console) -> None:
    t = make_table(f"Fallback across models: {ALIAS} = {' -> '.join(CHAIN)}")
    t.add_column("Phase")
    for model in CHAIN:
        t.add_column(model, justify="right")
    t.add_column("Errors", justify="right")
    t.add_row(f"{DOWN} down ({OUTAGE:g} s)", *(str(result.during.get(m, 0)) for m in CHAIN), str(result.errors))
    t.add_row(f"{DOWN} back", *(str(result.after.get(m, 0)) for m in CHAIN), "")
    console.print()
    show(console, t)
    console.print(f"{REQUESTS} requests for {ALIAS} in {result.seconds:.1f} s, the slowest took "
                  f"{result.slowest:.2f} s: while {DOWN} was down, {CHAIN[1]} answered without waiting "
                  f"for its cooldown (response.model names the model that answered).")
